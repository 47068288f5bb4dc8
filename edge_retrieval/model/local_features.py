"""Spatial verification: re-rank the top-K global candidates by local features + geometry.

The global descriptor says "looks like"; this module says "N matching points". ORB keypoints of the query
frame are matched to each candidate's stored keypoints (Hamming kNN, Lowe ratio test, one-to-one), and a
homography is fitted with RANSAC / USAC_MAGSAC. A catalog print lying tilted and partly covered on a desk
keeps dozens of inliers; a photo that is not in the catalog, or an empty table, gets ~0 against every
candidate. The caller decides "verified" (edge_retrieval/search/lookup.py: ``RecognitionConfig.accept_inliers``).

A solid object seen from another side fits no single homography (two faces of a box, a label round a can):
when the homography finds fewer inliers than the caller accepts, epipolar geometry is tried (a fundamental
matrix, USAC_MAGSAC) on the close matches only (Hamming distance <= ``epipolar_max_hamming``). A fundamental
matrix is a 7-point model that fits far more chance matches than a homography; keeping only close descriptors
starves chance pairs of points (9 % of the ratio-test matches of a wrong candidate are that close, 82 % of a
right one's inliers: docs/benchmarks.md, "Solid objects"), and its count must reach its own, higher threshold
``accept_epipolar_inliers``.

Why one-to-one: on smooth, low-texture catalog images (moon, clock, coins) a few catalog keypoints are the
nearest neighbour of many query keypoints; without the rule any textured frame "verifies" against them
because a homography can always map many points onto the same few.

The features of a catalog live in one mapped file per index generation: edge_retrieval/index/feature_store.py.

Costs (ORB extraction, knnMatch, MAGSAC vs RANSAC) and why verification stays sequential: docs/benchmarks.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import cv2
import numpy as np

from edge_retrieval.core.config import RecognitionConfig

DESC_BYTES = 32
MIN_MATCHES_TO_FIT = 8  # fewer ratio-test matches than this: no homography is tried, 0 inliers
_MAX_SCALE_CHANGE = 10.0
_METHODS = {"usac_magsac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC}
_EPIPOLAR_MIN_MATCHES = 10  # close matches needed before a fundamental matrix is tried (7 fit any F exactly)
_EPIPOLAR_MAX_MATCHES = 200  # the closest this many feed MAGSAC: a verification stays a few ms
_EPIPOLAR_ITERS = 1000
# A photo whose own view gives fewer keypoints is plain (a flower, a logo, a cell): it stays so, no tilted views.
# Their squeezed, sharper views find 3-10x its keypoints, which would carry a plain item over the line below which
# the search for more items names it by its cosine (edge_retrieval/search/multi_item.py, PLAIN_KEYPOINTS = 100):
# measured, that cost more items than the tilts found (docs/benchmarks.md, "Tilted catalog features").
TILT_MIN_KEYPOINTS = 100


class Verification(NamedTuple):
    """What verifying a query against one candidate found: ``inliers`` (-1: not verified; 0: no credible geometry),
    the query → catalog ``homography`` when one fits (the outline maps the catalog's corners through it), ``model``
    ("homography" or "epipolar": which geometry the inliers are counted under; "" for none) and, for an epipolar
    verification, the query-side inlier coordinates ``inlier_xy`` [N, 2] (the outline is drawn round them)."""

    inliers: int
    homography: np.ndarray | None = None
    model: str = ""
    inlier_xy: np.ndarray | None = None


NOT_VERIFIED = Verification(-1)


@dataclass(frozen=True)
class Features:
    """Local features of one image: ``xy`` float32 [N, 2] in the downscaled image's pixel coordinates,
    ``desc`` uint8 [N, 32] (ORB, matched by Hamming distance) or float32 [N, D] (a patch descriptor such as
    Patch-CKN, edge_retrieval/model/patch_descriptors.py, matched by L2), ``size_wh`` (width, height) of that
    downscaled image."""

    xy: np.ndarray
    desc: np.ndarray
    size_wh: tuple[int, int]

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    @staticmethod
    def empty(size_wh: tuple[int, int] = (0, 0)) -> Features:
        """No features (a flat image, or an item enrolled without them)."""
        return _empty(size_wh)


def _empty(size_wh: tuple[int, int]) -> Features:
    return Features(np.zeros((0, 2), np.float32), np.zeros((0, DESC_BYTES), np.uint8), size_wh)


def downscaled(img: np.ndarray, cfg: RecognitionConfig) -> np.ndarray:
    """``img`` (RGB uint8 HxWx3, or grayscale HxW) in grayscale, scaled down so its longer side is at most
    ``cfg.features_max_side_px``: the image every local feature (ORB, or a patch descriptor at ORB's keypoints)
    is computed on."""
    img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    h, w = img.shape[:2]
    scale = cfg.features_max_side_px / max(h, w)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return img


def orb_detector(cfg: RecognitionConfig, *, query: bool = False, n_features: int | None = None) -> cv2.ORB:
    """The ORB detector of ``cfg``: ``cfg.n_features`` keypoints for a catalog image, ``cfg.query_n_features``
    with ``query=True`` (``n_features``, when given: that many)."""
    n = n_features if n_features is not None else cfg.query_n_features if query else cfg.n_features
    return cv2.ORB_create(nfeatures=n, fastThreshold=cfg.fast_threshold)


def extract(rgb: np.ndarray, cfg: RecognitionConfig, *, query: bool = False) -> Features:
    """ORB features of an RGB uint8 HxWx3 image (grayscale HxW is accepted too), after downscaling so the
    longer side is at most ``cfg.features_max_side_px``: ``cfg.n_features`` keypoints for a catalog image,
    ``cfg.query_n_features`` with ``query=True``. A catalog image also gets ``cfg.enrol_tilt_features`` keypoints
    of each simulated tilted view (``cfg.enrol_tilts`` x ``cfg.enrol_tilt_angles_deg``, :func:`_tilted`), in the
    image's own coordinates, unless the image's own view gives fewer than ``TILT_MIN_KEYPOINTS`` (a plain photo
    stays plain). A flat image gives empty arrays, never None."""
    gray = downscaled(rgb, cfg)
    size_wh = (int(gray.shape[1]), int(gray.shape[0]))
    xy, desc = _orb(gray, orb_detector(cfg, query=query))
    if not query and cfg.enrol_tilts and len(xy) >= TILT_MIN_KEYPOINTS:
        parts = [(xy, desc)] + [_tilted(gray, t, phi, cfg) for t in cfg.enrol_tilts for phi in cfg.enrol_tilt_angles_deg]
        xy, desc = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if len(xy) == 0:
        return _empty(size_wh)
    return Features(xy, np.ascontiguousarray(desc, dtype=np.uint8), size_wh)


def _orb(gray: np.ndarray, orb: cv2.ORB, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ORB keypoint xy float32 [N, 2] and descriptors uint8 [N, 32] of ``gray`` (empty arrays when none)."""
    try:
        kps, desc = orb.detectAndCompute(gray, mask)
    except cv2.error:  # degenerate input (a few pixels across after downscaling): nothing to verify with
        kps, desc = (), None
    if desc is None or not kps:
        return np.zeros((0, 2), np.float32), np.zeros((0, DESC_BYTES), np.uint8)
    return np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2), desc


def _tilted(gray: np.ndarray, tilt: float, angle_deg: float, cfg: RecognitionConfig) -> tuple[np.ndarray, np.ndarray]:
    """ORB on an affine-simulated view of ``gray`` (ASIFT, Morel & Yu 2009): rotated by ``angle_deg``, then
    squeezed along x by ``tilt`` (= 1/cos of the viewing angle off the normal), the squeezed axis first blurred so
    it does not alias. ORB is rotation- and scale- but not affine-invariant: a print seen 50-70 degrees off its
    normal matches the simulated view, not the photo. Keypoints map back through the inverse warp, so they lie in
    the photo's coordinates and verification fits the same homography / epipolar geometry as for the photo's own."""
    h, w = gray.shape[:2]
    rot = cv2.getRotationMatrix2D((0.0, 0.0), angle_deg, 1.0)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) @ rot[:, :2].T
    lo = corners.min(axis=0)
    rot[:, 2] -= lo  # the rotated photo whole on its canvas
    squeeze = np.array([[1.0 / tilt, 0, 0], [0, 1, 0], [0, 0, 1]])
    a = (squeeze @ np.vstack([rot, [0, 0, 1]]))[:2]
    span = corners.max(axis=0) - lo
    out_wh = (max(1, int(np.ceil(span[0] / tilt))), max(1, int(np.ceil(span[1]))))
    rotated = cv2.warpAffine(gray, rot, (int(np.ceil(span[0])), out_wh[1]), flags=cv2.INTER_LINEAR)
    blurred = cv2.GaussianBlur(rotated, (0, 0), sigmaX=0.8 * np.sqrt(tilt * tilt - 1), sigmaY=0.01)
    view = cv2.resize(blurred, out_wh, interpolation=cv2.INTER_LINEAR)
    # the photo's own area, shrunk a little: the canvas edge is a strong corner that is in no real view
    mask = cv2.warpAffine(np.full((h, w), 255, np.uint8), a, out_wh, flags=cv2.INTER_NEAREST)
    mask = cv2.erode(mask, np.ones((9, 9), np.uint8))
    xy, desc = _orb(view, orb_detector(cfg, n_features=cfg.enrol_tilt_features), mask)
    if len(xy) == 0:
        return xy, desc
    back = cv2.invertAffineTransform(a)
    xy = (xy.astype(np.float64) @ back[:, :2].T + back[:, 2]).astype(np.float32)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)
    return xy[inside], desc[inside]


def ratio_matches(query: Features, cand: Features, cfg: RecognitionConfig) -> np.ndarray:
    """Putative matches query → candidate as int [M, 2] (query index, candidate index): Hamming 2-NN, Lowe
    ratio test, and each candidate keypoint kept only for its best-distance query keypoint (one-to-one: a smooth
    candidate with a few keypoints would otherwise absorb many query keypoints; tests/test_verify.py). Binary
    descriptors are compared by Hamming distance, float ones by L2."""
    if len(query) == 0 or len(cand) < 2:
        return np.zeros((0, 2), np.int64)
    norm = cv2.NORM_HAMMING if query.desc.dtype == np.uint8 else cv2.NORM_L2
    knn = cv2.BFMatcher(norm).knnMatch(query.desc, cand.desc, k=2)
    best: dict[int, tuple[float, int]] = {}
    for m in knn:
        if len(m) < 2 or m[0].distance >= cfg.ratio * m[1].distance:
            continue
        if m[0].trainIdx not in best or m[0].distance < best[m[0].trainIdx][0]:
            best[m[0].trainIdx] = (m[0].distance, m[0].queryIdx)
    return np.array([(q, t) for t, (_, q) in best.items()], dtype=np.int64).reshape(-1, 2)


def match_inliers(query: Features, cand: Features, cfg: RecognitionConfig) -> int:
    """Number of keypoints of ``query`` that a homography maps onto ``cand`` (0 when there is no credible
    one). Inliers are counted as distinct keypoint locations on both sides; a homography that mirrors the
    image or changes scale by more than 10x counts as none. Never raises on ordinary images. What counts as
    "verified" is the caller's: any 4 matches fit a homography, so false pairs reach 4–7 inliers (true pairs had
    ≥ 39 on the shipped views)."""
    return match_homography(query, cand, cfg)[0]


def match_homography(query: Features, cand: Features, cfg: RecognitionConfig) -> tuple[int, np.ndarray | None]:
    """``(inliers, H)``: what :func:`match_inliers` counts, and the 3x3 homography mapping ``query`` keypoint
    coordinates onto ``cand``'s (None when there is no credible one, and then 0 inliers)."""
    return _fit_homography(query, cand, ratio_matches(query, cand, cfg), cfg)


def _fit_homography(query: Features, cand: Features, pairs: np.ndarray,
                    cfg: RecognitionConfig) -> tuple[int, np.ndarray | None]:
    if len(pairs) < MIN_MATCHES_TO_FIT:
        return 0, None
    src = query.xy[pairs[:, 0]].reshape(-1, 1, 2)
    dst = cand.xy[pairs[:, 1]].reshape(-1, 1, 2)
    try:
        h, mask = cv2.findHomography(src, dst, _METHODS[cfg.ransac_method], cfg.ransac_reproj_px,
                                     maxIters=cfg.ransac_iters, confidence=0.995)
    except cv2.error:
        return 0, None
    if h is None or mask is None or not np.isfinite(h).all() or abs(h[2, 2]) < 1e-12:
        return 0, None
    a = h[:2, :2] / h[2, 2]
    det = float(np.linalg.det(a))
    if det <= 0 or not (1 / _MAX_SCALE_CHANGE ** 2 <= det <= _MAX_SCALE_CHANGE ** 2):
        return 0, None
    inl = mask.ravel().astype(bool)
    return _distinct(src.reshape(-1, 2)[inl], dst.reshape(-1, 2)[inl]), h


def _distinct(src: np.ndarray, dst: np.ndarray) -> int:
    """Inliers counted as distinct keypoint locations on both sides (ORB may put several keypoints, on several
    pyramid levels, on one spot: it counts once)."""
    q_loc = np.unique(np.round(src).astype(np.int32), axis=0)
    c_loc = np.unique(np.round(dst).astype(np.int32), axis=0)
    return int(min(len(q_loc), len(c_loc)))


def hamming(query: Features, cand: Features, pairs: np.ndarray) -> np.ndarray:
    """Hamming distance (bits, 0..256) of each matched descriptor pair (``pairs`` as from :func:`ratio_matches`)."""
    if len(pairs) == 0:
        return np.zeros(0, np.int64)
    xor = np.bitwise_xor(query.desc[pairs[:, 0]], cand.desc[pairs[:, 1]])
    return np.unpackbits(xor, axis=1).sum(axis=1, dtype=np.int64)


def match_epipolar(query: Features, cand: Features, cfg: RecognitionConfig,
                   pairs: np.ndarray | None = None, needed: int = 0) -> tuple[int, np.ndarray | None]:
    """``(inliers, query-side inlier xy [N, 2])`` of a fundamental matrix (USAC_MAGSAC) fitted on the close
    matches (Hamming <= ``cfg.epipolar_max_hamming``, at most the 200 closest) of ``query`` and ``cand``: the
    geometry of a solid seen from two viewpoints, whatever its shape. Inliers are counted as distinct locations;
    (0, None) when too few close matches or no credible fit. ``pairs``: the ratio-test matches, when known;
    ``needed``: the inliers the caller counts (no fit is tried on fewer close matches: a fit has no more inliers
    than matches)."""
    pairs = ratio_matches(query, cand, cfg) if pairs is None else pairs
    dist = hamming(query, cand, pairs)
    close = np.flatnonzero(dist <= cfg.epipolar_max_hamming)
    if len(close) < max(_EPIPOLAR_MIN_MATCHES, needed):
        return 0, None
    close = close[np.argsort(dist[close], kind="stable")[:_EPIPOLAR_MAX_MATCHES]]
    src = query.xy[pairs[close, 0]].astype(np.float64)
    dst = cand.xy[pairs[close, 1]].astype(np.float64)
    try:
        f, mask = cv2.findFundamentalMat(src, dst, cv2.USAC_MAGSAC, cfg.epipolar_reproj_px, 0.999, _EPIPOLAR_ITERS)
    except cv2.error:
        return 0, None
    if f is None or mask is None or f.shape != (3, 3) or not np.isfinite(f).all():
        return 0, None
    inl = mask.ravel().astype(bool)
    return _distinct(src[inl], dst[inl]), src[inl].astype(np.float32)


def verify(query: Features, cand: Features, cfg: RecognitionConfig, *, accept_inliers: int) -> Verification:
    """Verify ``query`` against one candidate: the homography first; when it finds fewer than ``accept_inliers``
    (what the caller accepts) and ``cfg.epipolar`` is on, epipolar geometry, which counts only when it reaches
    ``cfg.accept_epipolar_inliers`` (then its inliers are the ones reported). Otherwise the homography's count."""
    pairs = ratio_matches(query, cand, cfg)
    n, h = _fit_homography(query, cand, pairs, cfg)
    # the epipolar fallback picks its close matches by Hamming distance: binary (ORB) descriptors only
    if n >= accept_inliers or not cfg.epipolar or query.desc.dtype != np.uint8:
        return Verification(n, h, "homography" if h is not None else "")
    needed = max(cfg.accept_epipolar_inliers, accept_inliers)
    n_f, xy = match_epipolar(query, cand, cfg, pairs, needed)
    if n_f >= needed and n_f > n:
        return Verification(n_f, None, "epipolar", xy)
    return Verification(n, h, "homography" if h is not None else "")


def outline(query: Features, cand: Features, found: Verification) -> tuple[tuple[float, float], ...] | None:
    """The quad the page outlines for one verification: :func:`region` through its homography, or for an epipolar
    one (no homography maps a solid seen from another side) the smallest rotated rectangle round its query
    inliers, corners from the top-left clockwise, as fractions of the query frame. None without either."""
    if found.homography is not None or found.inlier_xy is None or len(found.inlier_xy) < 3:
        return region(query, cand, found.homography)
    qw, qh = query.size_wh
    if min(qw, qh) <= 0:
        return None
    corners = cv2.boxPoints(cv2.minAreaRect(found.inlier_xy.astype(np.float32)))
    centre = corners.mean(axis=0)
    # clockwise on screen (y down) from the corner up and to the left of the centre
    angle = np.arctan2(corners[:, 1] - centre[1], corners[:, 0] - centre[0])
    corners = corners[np.argsort(angle)]
    corners = np.roll(corners, -int(np.argmin(corners.sum(axis=1))), axis=0) / (qw, qh)
    return tuple((round(float(x), 4), round(float(y), 4)) for x, y in np.clip(corners, -0.5, 1.5))


def region(query: Features, cand: Features, h: np.ndarray | None) -> tuple[tuple[float, float], ...] | None:
    """Where the catalog image ``cand`` lies in the query frame: its four corners (top-left, top-right,
    bottom-right, bottom-left) mapped through ``h``, the homography verification found (query → catalog), as
    (x, y) fractions 0..1 of the query frame (clipped to -0.5..1.5, a print may reach out of view). None without
    a credible homography. The page outlines the matched print with it."""
    qw, qh = query.size_wh
    cw, ch = cand.size_wh
    if h is None or min(qw, qh, cw, ch) <= 0:
        return None
    try:
        inverse = np.linalg.inv(h)  # H maps query → catalog; the outline needs catalog → query
    except np.linalg.LinAlgError:
        return None
    corners = np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], np.float64).reshape(-1, 1, 2)
    mapped = cv2.perspectiveTransform(corners, inverse).reshape(-1, 2) / (qw, qh)
    if not np.isfinite(mapped).all():
        return None
    return tuple((round(float(x), 4), round(float(y), 4)) for x, y in np.clip(mapped, -0.5, 1.5))


def verify_candidates(query: Features, candidates: Sequence[Any],
                      get_features: Callable[[Any], Features | None], cfg: RecognitionConfig, *,
                      stop_inliers: int | None = None, accept_inliers: int | None = None) -> list[Verification]:
    """The :class:`Verification` of ``query`` against each candidate, in the given order (``inliers`` and
    ``homography`` first, so it reads as the ``(inliers, homography)`` pair it used to be): NOT_VERIFIED when it
    was not verified (no features, or skipped because an earlier candidate already reached ``stop_inliers``:
    candidates come best-first, so the first one that verifies well ends the work). ``get_features(candidate)``
    returns the candidate's stored Features, or None when it has none. ``accept_inliers``: the homography count
    the caller accepts; below it epipolar geometry is tried (``cfg.epipolar``); None = the homography only."""
    out: list[Verification] = []
    for cand in candidates:
        if stop_inliers is not None and out and max(v.inliers for v in out) >= stop_inliers:
            out.append(NOT_VERIFIED)
            continue
        feats = get_features(cand)
        if feats is None:
            out.append(NOT_VERIFIED)
        elif accept_inliers is None:
            n, h = match_homography(query, feats, cfg)
            out.append(Verification(n, h, "homography" if h is not None else ""))
        else:
            out.append(verify(query, feats, cfg, accept_inliers=accept_inliers))
    return out

