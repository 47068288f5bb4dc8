"""Spatial verification: re-rank the top-K global candidates by local features + geometry.

The global descriptor says "looks like"; this module says "N matching points". ORB keypoints of the query
frame are matched to each candidate's stored keypoints (Hamming kNN, Lowe ratio test, one-to-one), and a
homography is fitted with RANSAC / USAC_MAGSAC. A catalog print lying tilted and partly covered on a desk
keeps dozens of inliers; a photo that is not in the catalog, or an empty table, gets ~0 against every
candidate. The caller decides "verified" (device/lookup.py: ``RecognitionConfig.accept_inliers``).

Why one-to-one: on smooth, low-texture catalog images (moon, clock, coins) a few catalog keypoints are the
nearest neighbour of many query keypoints; without the rule any textured frame "verifies" against them
because a homography can always map many points onto the same few.

Features file (``FeatureStore``), one per index generation, beside the index, memory-mapped::

    offset 0   header, 16 bytes, little endian: magic b"ORBF", version u32 (=1), count u32, desc_bytes u32 (=32)
    16         offsets     int64  [count + 1]   row of item i is offsets[i] .. offsets[i+1]; offsets[0] = 0
    ...        size_wh     int32  [count, 2]    (width, height) of the downscaled image the xy refer to
    ...        xy          float32 [total, 2]   keypoint coordinates, total = offsets[count]
    ...        desc        uint8  [total, 32]   ORB descriptors
    file size = 16 + 8 * (count + 1) + 8 * count + 40 * total  (every section stays 8-byte aligned)

Bytes per item: 16 + 40 per keypoint, i.e. ≈ 20 KB at 500 features (≈ 2 GB for a 100k-item catalog, which
is why it is mapped, not read). Only the candidates' pages are touched per query.

Costs (ORB extraction, knnMatch, MAGSAC vs RANSAC) and why ``rerank`` stays sequential: README, "Benchmarks".
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config import RecognitionConfig
from .errors import CatalogIndexError

MAGIC = b"ORBF"
FORMAT_VERSION = 1
DESC_BYTES = 32
_HEADER = struct.Struct("<4sIII")
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
    def empty(size_wh: tuple[int, int] = (0, 0)) -> "Features":
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


def ratio_matches(query: Features, cand: Features, cfg: RecognitionConfig, *,
                  one_to_one: bool = True) -> np.ndarray:
    """Putative matches query → candidate as int [M, 2] (query index, candidate index): Hamming 2-NN, Lowe
    ratio test, and (``one_to_one``) each candidate keypoint kept only for its best-distance query keypoint.
    ``one_to_one=False`` exists to show why the rule is needed; verification always uses it."""
    if len(query) == 0 or len(cand) < 2:
        return np.zeros((0, 2), np.int64)
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(query.desc, cand.desc, k=2)
    best: dict[int, tuple[float, int]] = {}
    pairs = []
    for m in knn:
        if len(m) < 2 or m[0].distance >= cfg.ratio * m[1].distance:
            continue
        if not one_to_one:
            pairs.append((m[0].queryIdx, m[0].trainIdx))
        elif m[0].trainIdx not in best or m[0].distance < best[m[0].trainIdx][0]:
            best[m[0].trainIdx] = (m[0].distance, m[0].queryIdx)
    if one_to_one:
        pairs = [(q, t) for t, (_, q) in best.items()]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


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


def rerank(query: np.ndarray | Features, candidates: Sequence[Any],
           get_features: Callable[[Any], Features | None], cfg: RecognitionConfig, *,
           stop_inliers: int | None = None) -> list[int]:
    """Inliers of ``query`` (an RGB frame or its Features) against each candidate (see
    :func:`verify_candidates`): the count, or -1 when not verified."""
    qf = query if isinstance(query, Features) else extract(query, cfg, query=True)
    return [n for n, _ in verify_candidates(qf, candidates, get_features, cfg, stop_inliers=stop_inliers)]


# ------------------------------------------------------------------------------------- features file

def _layout(count: int, total: int) -> tuple[int, int, int, int, int]:
    """Byte offsets of (offsets, size_wh, xy, desc) and the file size."""
    off = _HEADER.size
    size = off + 8 * (count + 1)
    xy = size + 8 * count
    desc = xy + 8 * total
    return off, size, xy, desc, desc + DESC_BYTES * total


class FeatureStore:
    """All catalog items' Features in one memory-mapped file (format in the module docstring).

    ``get(row)`` returns views into the mapping (no copy); they stay valid after ``close()`` because they
    hold the mapping themselves. Reads are thread-safe.
    """

    def __init__(self, path: Path, raw: np.ndarray, offsets: np.ndarray, size_wh: np.ndarray,
                 xy: np.ndarray, desc: np.ndarray):
        """Use :meth:`open`; this constructor takes already-validated parts."""
        self.path = path
        self._raw: np.ndarray | None = raw
        self._offsets, self._size_wh, self._xy, self._desc = offsets, size_wh, xy, desc

    @staticmethod
    def write(path: str | os.PathLike, features: Sequence[Features]) -> int:
        """Write ``features`` (row i = catalog item i) to ``path`` and fsync it; returns the bytes written.
        The caller writes into its temporary generation folder and swaps atomically."""
        path = Path(path)
        counts = [len(f) for f in features]
        offsets = np.zeros(len(features) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        for i, f in enumerate(features):
            if f.xy.shape != (counts[i], 2) or f.desc.shape != (counts[i], DESC_BYTES):
                raise CatalogIndexError(f"features of item #{i} have shapes xy {f.xy.shape}, "
                                        f"desc {f.desc.shape}; expected [N, 2] and [N, {DESC_BYTES}]")
        size_wh = np.array([f.size_wh for f in features], np.int32).reshape(-1, 2)
        try:
            with open(path, "wb") as fh:
                fh.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(features), DESC_BYTES))
                fh.write(offsets.astype("<i8").tobytes())
                fh.write(size_wh.astype("<i4").tobytes())
                for f in features:
                    fh.write(np.ascontiguousarray(f.xy, "<f4").tobytes())
                for f in features:
                    fh.write(np.ascontiguousarray(f.desc, np.uint8).tobytes())
                fh.flush()
                os.fsync(fh.fileno())
                return fh.tell()
        except OSError as e:
            raise CatalogIndexError(f"could not write the features file {path}: {e}") from e

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Map the features file at ``path``. Raises CatalogIndexError naming the file when it is missing,
        truncated or corrupt (bad magic/version, sizes not matching its length, offsets not monotonic)."""
        path = Path(path)
        try:
            length = path.stat().st_size
            raw = np.memmap(path, dtype=np.uint8, mode="r") if length else np.zeros(0, np.uint8)
        except (OSError, ValueError) as e:
            raise CatalogIndexError(f"cannot map the features file {path}: {e}") from None

        def bad(why: str) -> CatalogIndexError:
            return CatalogIndexError(f"features file {path} is corrupt or truncated: {why}; rebuild the index")

        if length < _HEADER.size:
            raise bad(f"{length} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, count, desc_bytes = _HEADER.unpack(bytes(raw[:_HEADER.size]))
        if magic != MAGIC:
            raise bad(f"magic {magic!r}, expected {MAGIC!r}")
        if version != FORMAT_VERSION or desc_bytes != DESC_BYTES:
            raise bad(f"version {version} / desc_bytes {desc_bytes}, expected {FORMAT_VERSION} / {DESC_BYTES}")
        o_off, o_size, _, _, _ = _layout(count, 0)
        if length < o_size + 8 * count:
            raise bad(f"{length} bytes cannot hold the tables of {count} items")
        offsets = np.asarray(raw[o_off:o_size]).view("<i8")
        if offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise bad("item offsets are not monotonic from 0")
        total = int(offsets[-1])
        _, s_off, xy_off, d_off, end = _layout(count, total)
        if length != end:
            raise bad(f"{length} bytes, but {count} items with {total} keypoints need {end}")
        size_wh = np.asarray(raw[s_off:xy_off]).view("<i4").reshape(count, 2)
        xy = np.asarray(raw[xy_off:d_off]).view("<f4").reshape(total, 2)
        desc = np.asarray(raw[d_off:end]).reshape(total, DESC_BYTES)
        return cls(path, raw, offsets, size_wh, xy, desc)

    def __len__(self) -> int:
        return int(self._size_wh.shape[0])

    def get(self, row: int) -> Features:
        """Features of catalog item ``row`` (views into the mapping)."""
        if self._raw is None:
            raise CatalogIndexError(f"features file {self.path} is closed")
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} items in {self.path}")
        a, b = int(self._offsets[row]), int(self._offsets[row + 1])
        w, h = self._size_wh[row]
        return Features(self._xy[a:b], self._desc[a:b], (int(w), int(h)))

    def close(self) -> None:
        """Drop this store's reference to the mapping (views handed out keep it alive until released)."""
        self._raw = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
