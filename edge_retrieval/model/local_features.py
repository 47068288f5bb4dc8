"""Spatial verification: re-rank the top-K global candidates by local features + geometry.

The global descriptor says "looks like"; this module says "N matching points". ORB keypoints of the query
frame are matched to each candidate's stored keypoints (Hamming kNN, Lowe ratio test, one-to-one), and a
homography is fitted with RANSAC / USAC_MAGSAC. A catalog print lying tilted and partly covered on a desk
keeps dozens of inliers; a photo that is not in the catalog, or an empty table, gets ~0 against every
candidate. The caller decides "verified" (edge_retrieval/search/lookup.py: ``RecognitionConfig.accept_inliers``).

Why one-to-one: on smooth, low-texture catalog images (moon, clock, coins) a few catalog keypoints are the
nearest neighbour of many query keypoints; without the rule any textured frame "verifies" against them
because a homography can always map many points onto the same few.

The features of a catalog live in one mapped file per index generation: edge_retrieval/index/feature_store.py.

Costs (ORB extraction, knnMatch, MAGSAC vs RANSAC) and why verification stays sequential: docs/benchmarks.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge_retrieval.core.config import RecognitionConfig

DESC_BYTES = 32
MIN_MATCHES_TO_FIT = 8  # fewer ratio-test matches than this: no homography is tried, 0 inliers
_MAX_SCALE_CHANGE = 10.0
_METHODS = {"usac_magsac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC}


@dataclass(frozen=True)
class Features:
    """ORB features of one image: ``xy`` float32 [N, 2] in the downscaled image's pixel coordinates,
    ``desc`` uint8 [N, 32], ``size_wh`` (width, height) of that downscaled image."""

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


def extract(rgb: np.ndarray, cfg: RecognitionConfig, *, query: bool = False) -> Features:
    """ORB features of an RGB uint8 HxWx3 image (grayscale HxW is accepted too), after downscaling so the
    longer side is at most ``cfg.features_max_side_px``: ``cfg.n_features`` keypoints for a catalog image,
    ``cfg.query_n_features`` with ``query=True``. A flat image gives empty arrays, never None."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    h, w = gray.shape[:2]
    scale = cfg.features_max_side_px / max(h, w)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    size_wh = (int(gray.shape[1]), int(gray.shape[0]))
    orb = cv2.ORB_create(nfeatures=cfg.query_n_features if query else cfg.n_features, fastThreshold=cfg.fast_threshold)
    try:
        kps, desc = orb.detectAndCompute(gray, None)
    except cv2.error:  # degenerate input (a few pixels across after downscaling): nothing to verify with
        return _empty(size_wh)
    if desc is None or not kps:
        return _empty(size_wh)
    xy = np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2)
    return Features(xy, np.ascontiguousarray(desc, dtype=np.uint8), size_wh)


def ratio_matches(query: Features, cand: Features, cfg: RecognitionConfig) -> np.ndarray:
    """Putative matches query → candidate as int [M, 2] (query index, candidate index): Hamming 2-NN, Lowe
    ratio test, and each candidate keypoint kept only for its best-distance query keypoint (one-to-one: a smooth
    candidate with a few keypoints would otherwise absorb many query keypoints; tests/test_verify.py)."""
    if len(query) == 0 or len(cand) < 2:
        return np.zeros((0, 2), np.int64)
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(query.desc, cand.desc, k=2)
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
    pairs = ratio_matches(query, cand, cfg)
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
    # Distinct locations: ORB may put several keypoints (pyramid levels) on one spot; count it once.
    q_loc = np.unique(np.round(src.reshape(-1, 2)[inl]).astype(np.int32), axis=0)
    c_loc = np.unique(np.round(dst.reshape(-1, 2)[inl]).astype(np.int32), axis=0)
    return int(min(len(q_loc), len(c_loc))), h


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
                      stop_inliers: int | None = None) -> list[tuple[int, np.ndarray | None]]:
    """``(inliers, homography)`` of ``query`` against each candidate, in the given order: (-1, None) when it was
    not verified (no features, or skipped because an earlier candidate already reached ``stop_inliers``:
    candidates come best-first, so the first one that verifies well ends the work). ``get_features(candidate)``
    returns the candidate's stored Features, or None when it has none."""
    out: list[tuple[int, np.ndarray | None]] = []
    for cand in candidates:
        if stop_inliers is not None and out and max(n for n, _ in out) >= stop_inliers:
            out.append((-1, None))
            continue
        feats = get_features(cand)
        out.append((-1, None) if feats is None else match_homography(query, feats, cfg))
    return out

