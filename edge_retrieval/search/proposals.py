"""Where prints lie in a frame, from their edges: the outlines of flat rectangular things (a print, a card, a
label, a box's face) found as convex quadrilateral contours, the way a document scanner finds a page. Each is a
region proposal for the search for more items (edge_retrieval/search/multi_item.py): looked at rectified, a plain
print that ORB cannot verify gets the cosine of the print itself, not of a quarter of the frame, and its outline.
"""
from __future__ import annotations

import cv2
import numpy as np

WORK_SIDE_PX = 640  # edges are found on the frame downscaled to this longer side
MIN_AREA = 0.01  # of the frame: smaller quadrilaterals are texture, not a print
MAX_AREA = 0.7  # larger ones are the table's or the frame's own edge
MAX_SHAPES = 6  # proposals per frame, largest first: bounds the encodes a cluttered frame can cost
RECTIFIED_SIDE_PX = 320  # a proposal is warped flat to this longer side before it is encoded


def quad_area(quad) -> float:
    """Area of an outline (four x, y corners, in order) by the shoelace formula."""
    q = np.asarray(quad, np.float64)
    return abs(float(np.dot(q[:, 0], np.roll(q[:, 1], -1)) - np.dot(q[:, 1], np.roll(q[:, 0], -1)))) / 2


def _order(q: np.ndarray) -> np.ndarray:
    """Corners as top-left, top-right, bottom-right, bottom-left (the order of a catalog image's quad)."""
    s, d = q.sum(axis=1), np.diff(q, axis=1).ravel()
    return np.array([q[np.argmin(s)], q[np.argmin(d)], q[np.argmax(s)], q[np.argmax(d)]], np.float64)


def print_quads(rgb: np.ndarray) -> list[np.ndarray]:
    """Convex quadrilaterals of the frame (corners tl, tr, br, bl as x, y fractions), largest first, at most
    ``MAX_SHAPES``, none nearly the same as a larger one."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    h, w = gray.shape[:2]
    scale = min(1.0, WORK_SIDE_PX / max(h, w))
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    sh, sw = gray.shape[:2]
    edges = cv2.Canny(cv2.GaussianBlur(gray, (5, 5), 0), 20, 60)
    edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    found: list[tuple[float, np.ndarray]] = []
    for c in contours:
        hull = cv2.convexHull(c)  # a print's outer edge, whatever its picture adds inside
        # the hull's area, not the contour's: an edge with a gap (a plain print as light as the table there) is
        # traced as a thin open line of next to no area (true prints of `benchmarks multi_item` given an outline of
        # IoU >= 0.7: 0.82 → 0.86; the plain ones, which only an outline names well, 0.61 → 0.70)
        if cv2.contourArea(hull) < MIN_AREA * sw * sh:
            continue
        poly = cv2.approxPolyDP(hull, 0.05 * cv2.arcLength(hull, True), True)
        if len(poly) != 4 or not cv2.isContourConvex(poly):
            continue
        q = _order(poly.reshape(4, 2).astype(np.float64) / (sw, sh))
        area = quad_area(q)
        if MIN_AREA <= area <= MAX_AREA:
            found.append((area, q))
    found.sort(key=lambda aq: -aq[0])
    kept: list[np.ndarray] = []
    for _, q in found:
        if all(np.abs(q - k).max() > 0.03 for k in kept):
            kept.append(q)
        if len(kept) >= MAX_SHAPES:
            break
    return kept


def rectify(rgb: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """The part of the frame inside ``quad`` warped flat (its longer side ``RECTIFIED_SIDE_PX``)."""
    h, w = rgb.shape[:2]
    src = np.float32(np.asarray(quad) * (w, h))
    qw = max(np.linalg.norm(src[1] - src[0]), np.linalg.norm(src[2] - src[3]))
    qh = max(np.linalg.norm(src[3] - src[0]), np.linalg.norm(src[2] - src[1]))
    s = RECTIFIED_SIDE_PX / max(qw, qh, 1.0)
    ow, oh = max(16, round(qw * s)), max(16, round(qh * s))
    m = cv2.getPerspectiveTransform(src, np.float32([[0, 0], [ow, 0], [ow, oh], [0, oh]]))
    return cv2.warpPerspective(rgb, m, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def bounding_box(quad, margin: float = 0.02) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) fractions around ``quad``, with a margin, inside the frame."""
    q = np.asarray(quad)
    return (round(max(0.0, float(q[:, 0].min()) - margin), 4), round(max(0.0, float(q[:, 1].min()) - margin), 4),
            round(min(1.0, float(q[:, 0].max()) + margin), 4), round(min(1.0, float(q[:, 1].max()) + margin), 4))
