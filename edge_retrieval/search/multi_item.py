"""More than one item in a frame: after the lookup has decided on its best item, look for the others.

How (docs/benchmarks.md "Several items in a frame" has what each step buys and costs):
1. The query's ORB keypoints inside an accepted item's outline (its quad) are removed: what is left is the rest
   of the frame. A hard negative (another crop of the same photo) cannot verify on the print already named.
2. Region proposals at two scales besides the whole frame: the four quadrants (``CROPS``; not those the items
   found cover, nor flat ones), encoded in one batch where the runtime allows, and the outlines of flat
   rectangular things found from the frame's edges (edge_retrieval/search/proposals.py), encoded rectified.
3. Candidates: the lookup's own ranked list, then each proposal's nearest items, verified (every proposal's best
   first, within ``multi_verify_max``) against the keypoints of their proposal, taken closer (enlarged to ORB's
   working size). The one with the most verified points (≥ the bundle's ``accept_inliers``, or its learned
   decision) whose outline is a convex quadrilateral not lying on an item found is accepted and its keypoints
   removed; a candidate whose outline reached onto it is verified again on what is left.
4. An item too plain for ORB (under ``PLAIN_KEYPOINTS`` keypoints in the catalog) can never verify: a proposal
   names it by its cosine (the bundle's ``accept_score``, and a lead of ``MIN_SCORE_LEAD`` over the proposal's
   next item), with the proposal's outline when the proposal is a found shape (``multi_by_score``).
5. Bounded: at most ``max_items`` items, ``multi_verify_max`` verifications, four crops and ``MAX_SHAPES``
   outlines a frame, whatever it holds (dozens of tiny items, a chessboard, a black frame).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import cv2
import numpy as np

from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.core.results import Candidate
from edge_retrieval.model.local_features import Features, extract, match_homography, region
from edge_retrieval.search.proposals import bounding_box, print_quads, quad_area, rectify

# Region proposals: (x0, y0, x1, y1) fractions of the frame — the four quadrants, overlapping a little so a print
# on a quadrant's edge lies whole in one of them.
CROPS = ((0.0, 0.0, 0.58, 0.58), (0.42, 0.0, 1.0, 0.58), (0.0, 0.42, 0.58, 1.0), (0.42, 0.42, 1.0, 1.0))
MIN_QUAD_AREA = 0.004  # of the frame: a smaller outline is a degenerate homography, not a print
MAX_QUAD_OVERLAP = 0.3  # of the smaller outline: an item lying on one already found is the same print
BLANK_STD = 4.0  # grey levels: a proposal this flat (a black frame, a bare wall) is not looked at
PER_CROP = 5  # candidates taken from each proposal's nearest items
MAX_COVERED = 0.6  # a proposal this much covered by items found already is not looked at
PLAIN_KEYPOINTS = 100  # a catalog item with fewer stored keypoints (of n_features = 500) is too plain to verify
# chosen on the scikit-image frames of `python -m benchmarks multi_item` (docs/benchmarks.md): it removed the 4
# wrong items named by cosine there and kept 29 of 36 right ones
MIN_SCORE_LEAD = 0.1
MAX_COVERED_BY_SCORE = 0.25  # … and names nothing by its cosine alone (the cosine would be of the item found)


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


def blank(rgb: np.ndarray, box) -> bool:
    """Whether the part ``box`` of the frame is flat (no print can be recognised there)."""
    part = crop(rgb, box)[::4, ::4]
    return float(part.std()) < BLANK_STD


def crop(rgb: np.ndarray, box) -> np.ndarray:
    """The part ``box`` (x0, y0, x1, y1 fractions) of a frame."""
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[int(box[1] * h):max(int(box[3] * h), 1), int(box[0] * w):max(int(box[2] * w), 1)])


def crop_features(rgb: np.ndarray, box, query: Features, rc: RecognitionConfig) -> Features:
    """ORB keypoints of the part ``box`` of the frame, looked at closer: the part is enlarged to the size the
    whole frame's keypoints were taken at (``features_max_side_px``), so a print a third of the frame across
    gets as many keypoints as a whole frame would (enlarging at most 2× instead: item recall 0.905 → 0.895). Coordinates are those of ``query`` (the whole frame's
    features), so outlines and masks need no conversion."""
    h, w = rgb.shape[:2]
    part = crop(rgb, box)
    ph, pw = part.shape[:2]
    grow = rc.features_max_side_px / max(ph, pw)
    if grow > 1.0:
        part = cv2.resize(part, (round(pw * grow), round(ph * grow)), interpolation=cv2.INTER_LINEAR)
    f = extract(part, rc, query=True)
    if len(f) == 0:
        return Features.empty(query.size_wh)
    fx, fy = pw / f.size_wh[0], ph / f.size_wh[1]
    qx, qy = query.size_wh[0] / w, query.size_wh[1] / h
    xy = (f.xy * (fx, fy) + (int(box[0] * w), int(box[1] * h))) * (qx, qy)
    return Features(xy.astype(np.float32), f.desc, query.size_wh)


def covered(box, quads: list) -> float:
    """The share of ``box`` (x0, y0, x1, y1 fractions) that ``quads`` cover (their union, on a coarse grid)."""
    if not quads:
        return 0.0
    grid = np.zeros((48, 64), np.uint8)
    for q in quads:
        cv2.fillPoly(grid, [np.round(np.asarray(q) * (64, 48)).astype(np.int32)], 1)
    part = grid[int(box[1] * 48):max(int(box[3] * 48), 1), int(box[0] * 64):max(int(box[2] * 64), 1)]
    return float(part.mean()) if part.size else 1.0


class MoreItems:
    """The search for the other items of one frame (one instance per lookup): the index, the encoder's batch
    embedding and the decision rule are handed in by ``Lookup``."""

    def __init__(self, rc: RecognitionConfig, idx, embed_batch: Callable[..., list[np.ndarray]],
                 accept_inliers: int, accept_score: float | None,
                 accept: Callable[[Candidate, list[Candidate]], bool]):
        """``accept_inliers``: the lookup's (the bundle's) verified-points threshold; ``accept_score``: its cosine
        threshold (None: no item by its cosine alone); ``accept(item, verified)``: the lookup's decision for one
        more item given every candidate verified on the same remaining keypoints."""
        self.rc, self.idx, self.embed_batch, self.accept = rc, idx, embed_batch, accept
        self.accept_inliers, self.accept_score = accept_inliers, accept_score

    def _plain(self, item_id: str) -> bool:
        """Whether ORB cannot verify the item (fewer than ``PLAIN_KEYPOINTS`` stored keypoints): only then may its
        cosine alone name it; a textured item that did not verify is not there."""
        feats = self.idx.features(item_id)
        return feats is None or len(feats) < PLAIN_KEYPOINTS

    def _by_score(self, tops: dict[tuple, list[Candidate]], shapes: dict[tuple, np.ndarray], items: list[Candidate],
                  quads: list) -> list[Candidate]:
        """Items too plain for ORB (a smooth photo has a few dozen keypoints, rarely 8 verified points): a proposal
        that items found so far hardly cover names its nearest item when its cosine passes the bundle's
        ``accept_score`` (the rule a whole frame is held to without verification) and it leads the proposal's next
        item by ``MIN_SCORE_LEAD`` (near-identical plain items, two crops of one colour wheel, stay unnamed). Such
        an item has no inliers; its outline is the proposal's when the proposal is a found shape, else none.
        Off where a learned decision is configured (it needs verified points)."""
        if self.accept_score is None or any(i.quad is None for i in items):
            return []  # an item named without an outline could be in any proposal: its look-alikes would be named
        named, more, quads = {i.id for i in items}, [], list(quads)
        # the outlined proposals first: a print seen whole and flat, and the item named there has an outline
        for box, top in sorted(tops.items(), key=lambda bt: bt[0] not in shapes):
            outline = shapes.get(box)
            if outline is not None:
                clear = all(overlap(outline, f) < MAX_QUAD_OVERLAP for f in quads)
            else:
                clear = covered(box, quads) < MAX_COVERED_BY_SCORE
            if len(items) + len(more) >= self.rc.max_items or not top or not clear:
                continue
            lead = top[0].score - (top[1].score if len(top) > 1 else 0.0)
            if (top[0].id not in named and top[0].score >= self.accept_score and lead >= MIN_SCORE_LEAD
                    and self._plain(top[0].key)):
                quad = None if outline is None else tuple((round(float(x), 4), round(float(y), 4)) for x, y in outline)
                more.append(replace(top[0], inliers=None, quad=quad))
                named.add(top[0].id)
                if quad is not None:
                    quads.append(quad)
        return more

    def find(self, rgb: np.ndarray, query: Features, first: Candidate | None, ranked: list[Candidate],
             timings: dict[str, float]) -> list[Candidate]:
        """Every item of the frame: ``first`` (the lookup's accepted match, None when it accepted none) first,
        then the others in the order they were found (most verified points first), at most ``max_items``."""
        rc = self.rc
        t0 = time.perf_counter()
        items = [first] if first is not None else []
        quads = [i.quad for i in items if i.quad is not None]
        named = {i.id for i in items}
        # the lookup's own candidates; those it verified on the whole frame without success stay rejected
        pool: dict[str, tuple[Candidate, tuple | None]] = {
            c.id: (c, None) for c in ranked
            if c.id not in named and c.score >= rc.multi_min_score and (c.inliers is None or c.inliers >= self.accept_inliers)}
        rank = {c.id: r for r, c in enumerate(ranked)}  # where each candidate stands in its own list
        # not the whole frame's keypoints: they crowd onto its most textured parts, a smooth print may have none
        boxes = [b for b in CROPS if covered(b, quads) < MAX_COVERED and not blank(rgb, b)]
        # outlines of prints found from their edges: looked at rectified, their box is where they are verified
        shapes = {bounding_box(q): q for q in (print_quads(rgb) if rc.multi_shapes else [])
                  if all(overlap(q, f) < MAX_QUAD_OVERLAP for f in quads)}
        tops: dict[tuple, list[Candidate]] = {}  # each proposal's nearest items
        if boxes or shapes:
            t1 = time.perf_counter()
            vectors = self.embed_batch([crop(rgb, b) for b in boxes], short_side_px=rc.multi_crop_px)
            for q in shapes.values():  # at the print's own size in the frame: no pixels it does not have
                side = min(rgb.shape[0] * float(np.ptp(q[:, 1])), rgb.shape[1] * float(np.ptp(q[:, 0])))
                vectors += self.embed_batch([rectify(rgb, q)], short_side_px=max(112, int(side)))
            timings["multi_encode"] = (time.perf_counter() - t1) * 1e3
            for b, v in zip(boxes + list(shapes), vectors):
                tops[b] = self.idx.query(v, PER_CROP)
                for r, c in enumerate(tops[b]):
                    if c.id not in named and c.score >= rc.multi_min_score and (
                            c.id not in pool or pool[c.id][1] is None or c.score > pool[c.id][0].score):
                        pool[c.id] = (replace(c, inliers=None), b)
                        rank[c.id] = min(r, rank.get(c.id, r))
        box_features: dict[tuple, Features] = {}

        def features_of(box) -> Features:
            if box is None:
                return without(query, quads)
            if box not in box_features:
                box_features[box] = crop_features(rgb, box, query, rc)
            return without(box_features[box], quads)

        # every proposal's best candidate first, then the second ones…: each print gets its likeliest item verified
        # before the budget goes to the runners-up of one crowded region
        order = sorted(pool.values(), key=lambda cb: (rank[cb[0].id], -cb[0].score))
        tried: dict[str, tuple[int, np.ndarray | None, Features]] = {}
        budget = rc.multi_verify_max
        while len(items) < rc.max_items:
            for c, box in order:
                if budget <= 0:
                    break
                if c.id not in tried:
                    feats, where = self.idx.features(c.key), features_of(box)
                    n, h = match_homography(where, feats, rc) if feats is not None else (0, None)
                    tried[c.id] = (n, h, where)
                    budget -= 1
            verified = [c.with_inliers(tried[c.id][0]) for c, _ in order if c.id in tried]
            ok = sorted((c for c in verified if c.inliers >= self.accept_inliers), key=lambda c: -c.inliers)
            if not ok:
                break
            best = ok[0]
            n, h, where = tried[best.id]
            quad = region(where, self.idx.features(best.key), h)
            order = [(c, b) for c, b in order if c.id != best.id]
            if not sane(quad, quads) or not self.accept(best, verified):
                continue
            items.append(replace(best, quad=quad))
            quads.append(quad)
            for c in ok[1:]:  # those whose outline reaches onto the new item verified on it, perhaps: again on the rest
                n_c, h_c, where_c = tried[c.id]
                outline = region(where_c, self.idx.features(c.key), h_c)
                if outline is None or not _convex(outline) or overlap(outline, quad) > 0.0:
                    tried.pop(c.id, None)
        items += self._by_score(tops, shapes, items, quads)
        # "multi": the search's own work besides the crops' encode (so the timings still add up to "total")
        timings["multi"] = (time.perf_counter() - t0) * 1e3 - timings.get("multi_encode", 0.0)
        return items
