"""More than one item in a frame: after the lookup has accepted its best item, look for the others.

How (docs/benchmarks.md "Several items in a frame" has what each step buys and costs):
1. The query's ORB keypoints inside an accepted item's outline (its quad) are removed: what is left is the rest
   of the frame. A hard negative (another crop of the same photo) cannot verify on the print already named.
2. Candidates: the lookup's own ranked list (whole frame), then region proposals — the four quadrants of the
   frame (``CROPS``, the second scale after the whole frame), encoded in one batch where the runtime allows —
   but only the quadrants that still hold enough unexplained keypoints for an item to verify there (a frame
   with one print and a bare table around it costs no encode).
3. Each candidate (cosine ≥ ``multi_min_score``) is verified against the remaining keypoints; the best one with
   ``accept_inliers`` or more whose outline is a sane quadrilateral not lying on an item already found is
   accepted, its keypoints removed, and the candidates that also verified are verified again on what is left.
4. Bounded: at most ``max_items`` items and ``multi_verify_max`` verifications a frame, whatever the frame holds
   (dozens of tiny items, a chessboard, a black frame).

An extra item is accepted only when it verifies (the bundle's ``accept_inliers``, or its learned decision over
the item's verified candidates): a crop's cosine alone is not evidence, and an item needs an outline.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import cv2
import numpy as np

from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.core.results import Candidate
from edge_retrieval.model.local_features import Features, match_homography, region

# Region proposals: (x0, y0, x1, y1) fractions of the frame — the four quadrants, overlapping a little so a print
# on a quadrant's edge lies whole in one of them.
CROPS = ((0.0, 0.0, 0.58, 0.58), (0.42, 0.0, 1.0, 0.58), (0.0, 0.42, 0.58, 1.0), (0.42, 0.42, 1.0, 1.0))
MIN_QUAD_AREA = 0.004  # of the frame: a smaller outline is a degenerate homography, not a print
MAX_QUAD_OVERLAP = 0.3  # of the smaller outline: an item lying on one already found is the same print
PER_CROP = 5  # candidates taken from each proposal's nearest items


def quad_area(quad) -> float:
    """Area of an outline in frame fractions (shoelace; 0 for a self-crossing or degenerate one)."""
    q = np.asarray(quad, np.float64)
    return abs(float(np.dot(q[:, 0], np.roll(q[:, 1], -1)) - np.dot(q[:, 1], np.roll(q[:, 0], -1)))) / 2


def _convex(quad) -> bool:
    q = np.asarray(quad, np.float64)
    d = np.roll(q, -1, axis=0) - q
    cross = d[:, 0] * np.roll(d[:, 1], -1) - d[:, 1] * np.roll(d[:, 0], -1)
    return bool((cross > 0).all() or (cross < 0).all())


def overlap(a, b) -> float:
    """Intersection area of two convex outlines over the smaller one's area."""
    pa, pb = np.asarray(a, np.float32), np.asarray(b, np.float32)
    inter, _ = cv2.intersectConvexConvex(pa, pb)
    small = min(quad_area(a), quad_area(b))
    return float(inter) / small if small > 0 else 1.0


def sane(quad, found: list) -> bool:
    """Whether ``quad`` can be the outline of a new print: convex, not tiny, not lying on one already found."""
    if quad is None or not _convex(quad) or quad_area(quad) < MIN_QUAD_AREA:
        return False
    return all(overlap(quad, f) < MAX_QUAD_OVERLAP for f in found)


def without(query: Features, quads: list) -> Features:
    """``query`` without the keypoints inside any of ``quads`` (frame fractions)."""
    if not quads or len(query) == 0:
        return query
    w, h = query.size_wh
    mask = np.zeros((h, w), np.uint8)
    for q in quads:
        cv2.fillPoly(mask, [np.round(np.asarray(q) * (w, h)).astype(np.int32)], 1)
    x = np.clip(query.xy[:, 0].astype(np.int32), 0, w - 1)
    y = np.clip(query.xy[:, 1].astype(np.int32), 0, h - 1)
    keep = mask[y, x] == 0
    return Features(query.xy[keep], query.desc[keep], query.size_wh)


def _keypoints_in(query: Features, box) -> int:
    w, h = query.size_wh
    x, y = query.xy[:, 0] / max(w, 1), query.xy[:, 1] / max(h, 1)
    return int(((x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])).sum())


def crop(rgb: np.ndarray, box) -> np.ndarray:
    """The part ``box`` (x0, y0, x1, y1 fractions) of a frame."""
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[int(box[1] * h):max(int(box[3] * h), 1), int(box[0] * w):max(int(box[2] * w), 1)])


class MoreItems:
    """The search for the other items of one frame (one instance per lookup): the index, the encoder's batch
    embedding and the decision rule are handed in by ``Lookup``."""

    def __init__(self, rc: RecognitionConfig, idx, embed_batch: Callable[[list[np.ndarray]], list[np.ndarray]],
                 accept_inliers: int, accept: Callable[[Candidate, list[Candidate]], bool]):
        """``accept_inliers``: the lookup's (the bundle's) verified-points threshold; ``accept(item, verified)``:
        the lookup's decision for one more item given every candidate verified on the same remaining keypoints."""
        self.rc, self.idx, self.embed_batch, self.accept = rc, idx, embed_batch, accept
        self.accept_inliers = accept_inliers

    def find(self, rgb: np.ndarray, query: Features, first: Candidate, ranked: list[Candidate],
             timings: dict[str, float]) -> list[Candidate]:
        """Every item of the frame, ``first`` (the lookup's accepted, outlined match) first, then the others in
        the order they were found (most inliers first), at most ``max_items``."""
        rc = self.rc
        t0 = time.perf_counter()
        items = [first]
        residual = without(query, [first.quad])
        need = 2 * self.accept_inliers  # keypoints a region needs before an item could verify in it
        pool: dict[str, Candidate] = {c.id: c for c in ranked if c.id != first.id and c.score >= rc.multi_min_score}
        boxes = [b for b in CROPS if _keypoints_in(residual, b) >= need] if len(residual) >= need else []
        if boxes and rc.max_items > 1:
            t1 = time.perf_counter()
            vectors = self.embed_batch([crop(rgb, b) for b in boxes])
            timings["multi_encode"] = (time.perf_counter() - t1) * 1e3
            for v in vectors:
                for c in self.idx.query(v, PER_CROP):
                    if c.id != first.id and c.score >= rc.multi_min_score and (
                            c.id not in pool or c.score > pool[c.id].score):
                        pool[c.id] = c
        order = sorted(pool.values(), key=lambda c: -c.score)
        tried: dict[str, tuple[int, np.ndarray | None]] = {}
        budget = rc.multi_verify_max
        while len(items) < rc.max_items and len(residual) >= self.accept_inliers:
            for c in order:
                if budget <= 0:
                    break
                if c.id not in tried:
                    feats = self.idx.features(c.id)
                    tried[c.id] = match_homography(residual, feats, rc) if feats is not None else (0, None)
                    budget -= 1
            verified = [c.with_inliers(tried[c.id][0]) for c in order if c.id in tried]
            ok = sorted((c for c in verified if c.inliers >= self.accept_inliers), key=lambda c: -c.inliers)
            if not ok:
                break
            best = ok[0]
            quad = region(residual, self.idx.features(best.id), tried[best.id][1])
            order = [c for c in order if c.id != best.id]
            if not sane(quad, [i.quad for i in items]) or not self.accept(best, verified):
                continue
            items.append(replace(best, quad=quad))
            residual = without(residual, [quad])
            for c in ok[1:]:  # they verified on what is now removed, perhaps: verify them again on the rest
                tried.pop(c.id, None)
        # "multi": the search's own work besides the crops' encode (so the timings still add up to "total")
        timings["multi"] = (time.perf_counter() - t0) * 1e3 - timings.get("multi_encode", 0.0)
        return items
