"""More than one item in a frame: after the lookup has decided on its best item, look for the others.

How (docs/benchmarks.md "Several items in a frame" has what each step buys and costs):
1. The query's ORB keypoints inside an accepted item's outline (its quad) are removed: what is left is the rest
   of the frame. A hard negative (another crop of the same photo) cannot verify on the print already named.
   Where fewer than ``MIN_REST_KEYPOINTS`` are left, nothing else is looked for: a frame of one item costs a mask.
2. The lookup's own ranked candidates are verified first, on those keypoints (no encode, no ORB).
3. Region proposals besides the whole frame, cheapest and likeliest first, each stage verified and settled before
   the next: the outlines of flat rectangular things found from the frame's edges (edge_retrieval/search/
   proposals.py), encoded rectified at their own size; then the four quadrants (``CROPS``; not those the items
   found cover, nor flat ones), in one batch where the runtime allows, and only where keypoints are left outside
   the items found and the outlines looked at (or where a plain print could still be named by its cosine, 4.).
4. Candidates: each proposal's nearest items, verified a rank at a time (every open proposal's best first, within
   ``multi_verify_max``) against the keypoints of their proposal, taken closer (enlarged to ORB's working size).
   The one with the most verified points (≥ the bundle's ``accept_inliers``, or its learned decision) whose
   outline is a convex quadrilateral not lying on an item found is accepted and its keypoints removed; a
   candidate whose outline reached onto it is verified again on what is left; a proposal it fills is closed.
5. An item too plain for ORB (under ``PLAIN_KEYPOINTS`` keypoints in the catalog) can never verify: a proposal
   names it by its cosine (the bundle's ``accept_score``, and a lead of ``MIN_SCORE_LEAD`` over the proposal's
   next item, ``MIN_OUTLINE_SCORE_LEAD`` in a found shape), with the proposal's outline when the proposal is a
   found shape (``multi_by_score``).
6. Bounded: at most ``max_items`` items, ``multi_verify_max`` verifications, four crops and ``MAX_SHAPES``
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
# … in a found outline (the print seen whole, rectified; the 0.1 was chosen before outlines were proposals) the right
# item leads another crop of the same photo by less: 8 plain prints missed on those frames stood top of their outline
# with a cosine >= 0.5 and a lead of 0.017-0.057, the one wrong item top of an outline led by 0.022 (chosen on the
# scikit-image frames: 6 more named, none wrong; the scikit-learn + matplotlib frames had no such outline)
MIN_OUTLINE_SCORE_LEAD = 0.03
MAX_COVERED_BY_SCORE = 0.25  # … and names nothing by its cosine alone (the cosine would be of the item found)
# keypoints of the frame left outside the items found, under which nothing else is looked for: one-item views of the
# camera-view benchmark leave a median of 1 (87 % under 20), frames of 2–4 prints a median of 453 (2 of 123 under 20)
MIN_REST_KEYPOINTS = 20  # … and a quadrant is verified in only where this many are left outside the outlines too


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


def inside(features: Features, box) -> int:
    """How many of ``features`` lie in ``box`` (x0, y0, x1, y1 fractions of the frame)."""
    if len(features) == 0:
        return 0
    x, y = features.xy[:, 0] / features.size_wh[0], features.xy[:, 1] / features.size_wh[1]
    return int(((x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])).sum())


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
        item by ``MIN_SCORE_LEAD`` (near-identical plain items, two crops of one colour wheel, stay unnamed; in a
        found outline, the print seen whole and flat, by ``MIN_OUTLINE_SCORE_LEAD``). Such
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
            need = MIN_SCORE_LEAD if outline is None else MIN_OUTLINE_SCORE_LEAD
            if (top[0].id not in named and top[0].score >= self.accept_score and lead >= need
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
        # nothing else here: the item found holds (nearly) every keypoint of the frame (the frame's keypoints are
        # already taken, so a one-item frame ends the search at the cost of a mask), or it was named by the whole
        # frame's cosine alone: it fills the view, and without its outline no region can be told apart from it
        if first is not None and (first.quad is None or len(without(query, quads)) < MIN_REST_KEYPOINTS):
            timings["multi"] = (time.perf_counter() - t0) * 1e3
            return items
        search = _Search(self, rgb, query, items, quads, named)
        # 1. the lookup's own candidates, verified on the rest of the frame's keypoints (no encode, no ORB); those
        # it verified on the whole frame without success stay rejected
        search.add([(c, None) for c in ranked if c.id not in named and c.score >= rc.multi_min_score
                    and (c.inliers is None or c.inliers >= self.accept_inliers)])
        search.settle()
        # 2. outlines of prints found from their edges: looked at rectified, their box is where they are verified
        shapes = {bounding_box(q): q for q in (print_quads(rgb) if rc.multi_shapes else [])}
        shapes = {b: q for b, q in shapes.items() if all(overlap(q, f) < MAX_QUAD_OVERLAP for f in quads)}
        if shapes and len(items) < rc.max_items:
            t1 = time.perf_counter()
            vectors = []
            for q in shapes.values():  # at the print's own size in the frame: no pixels it does not have
                side = min(rgb.shape[0] * float(np.ptp(q[:, 1])), rgb.shape[1] * float(np.ptp(q[:, 0])))
                vectors += self.embed_batch([rectify(rgb, q)], short_side_px=max(112, int(side)))
            timings["multi_encode"] = timings.get("multi_encode", 0.0) + (time.perf_counter() - t1) * 1e3
            search.shapes.update(shapes)
            search.propose(list(shapes), vectors)
            search.settle()
        # 3. the four quadrants (not those the items found cover, nor flat ones), in one batch where the runtime
        # allows: not the whole frame's keypoints, they crowd onto its most textured parts (a smooth print has none)
        rest = without(query, quads + list(shapes.values()))  # an outline looked at is explained too
        plain_ok = self.accept_score is not None and all(i.quad is not None for i in items)
        boxes = [b for b in CROPS if covered(b, quads) < MAX_COVERED and not blank(rgb, b)]
        # a quadrant with keypoints left may hold a print to verify; one without, only a plain print (named by its
        # cosine where the items found hardly cover it): encoded, its candidates not verified
        textured = [b for b in boxes if inside(rest, b) >= MIN_REST_KEYPOINTS]
        boxes = textured + [b for b in boxes if b not in textured and plain_ok
                            and covered(b, quads) < MAX_COVERED_BY_SCORE]
        if boxes and len(items) < rc.max_items:
            t1 = time.perf_counter()
            vectors = self.embed_batch([crop(rgb, b) for b in boxes], short_side_px=rc.multi_crop_px)
            timings["multi_encode"] = timings.get("multi_encode", 0.0) + (time.perf_counter() - t1) * 1e3
            search.propose(boxes, vectors, verify=textured)
            search.settle()
        items += self._by_score(search.tops, shapes, items, quads)
        # "multi": the search's own work besides the crops' encode (so the timings still add up to "total")
        timings["multi"] = (time.perf_counter() - t0) * 1e3 - timings.get("multi_encode", 0.0)
        return items


class _Search:
    """The verification state of one frame's search: the candidates (each with the proposal it is verified in),
    those verified, the budget left, the items found (shared with ``MoreItems.find``) and their outlines."""

    def __init__(self, more: MoreItems, rgb: np.ndarray, query: Features, items: list[Candidate], quads: list,
                 named: set[str]):
        self.more, self.rc, self.rgb, self.query = more, more.rc, rgb, query
        self.items, self.quads, self.named = items, quads, named
        self.pool: dict[str, tuple[Candidate, tuple | None]] = {}
        self.rank: dict[str, int] = {}  # where each candidate stands in its own proposal's list
        self.tried: dict[str, tuple[int, np.ndarray | None, Features]] = {}
        self.dropped: set[str] = set()  # verified, but its outline was not that of a new print
        self.tops: dict[tuple, list[Candidate]] = {}  # each proposal's nearest items
        self.box_features: dict[tuple, Features] = {}
        self.shapes: dict[tuple, np.ndarray] = {}  # the outline proposals, by their box
        self._closed: dict[tuple, bool] = {}
        self.budget = self.rc.multi_verify_max

    def add(self, found: list[tuple[Candidate, tuple | None]]) -> None:
        """Candidates of one proposal (or the lookup's list), best first; an item keeps its best cosine and is
        verified again where a proposal gives it a better one."""
        for r, (c, box) in enumerate(found):
            if c.id in self.named or c.id in self.dropped or c.score < self.rc.multi_min_score:
                continue
            if c.id not in self.pool or c.score > self.pool[c.id][0].score:
                if c.id in self.pool:
                    self.tried.pop(c.id, None)
                self.pool[c.id] = (c if box is None else replace(c, inliers=None), box)
                self.rank[c.id] = min(r, self.rank.get(c.id, r))

    def propose(self, boxes: list[tuple], vectors: list[np.ndarray], verify: list[tuple] | None = None) -> None:
        """The nearest items of each proposal (its box and its descriptor) join the candidates (only those of
        ``verify``'s boxes when it is given; the others' are kept for the naming by cosine)."""
        for b, v in zip(boxes, vectors):
            self.tops[b] = self.more.idx.query(v, PER_CROP)
            if verify is None or b in verify:
                self.add([(c, b) for c in self.tops[b]])

    def features_of(self, box) -> Features:
        """The keypoints a candidate of ``box`` is verified on: the whole frame's (``box`` None) or the box's own,
        taken closer; either without those of the items found."""
        if box is None:
            return without(self.query, self.quads)
        if box not in self.box_features:
            self.box_features[box] = crop_features(self.rgb, box, self.query, self.rc)
        return without(self.box_features[box], self.quads)

    def closed(self, box) -> bool:
        """Whether the items found already fill proposal ``box``: an outline lying on one, a quadrant mostly
        covered (the whole frame, ``box`` None, never is)."""
        if box is None:
            return False
        key = (box, len(self.quads))  # items are only ever added: the answer holds until the next one
        if key not in self._closed:
            self._closed[key] = (any(overlap(self.shapes[box], f) >= MAX_QUAD_OVERLAP for f in self.quads)
                                 if box in self.shapes else covered(box, self.quads) >= MAX_COVERED)
        return self._closed[key]

    def settle(self) -> None:
        """Verify candidates within the budget, a rank at a time: every open proposal's best candidate, then the
        second ones…, so each print gets its likeliest item verified before the budget goes to the runners-up of
        one crowded region. After each rank the items shown are accepted, most verified points first; a proposal
        an item found fills is not looked at further."""
        rc, more = self.rc, self.more
        while len(self.items) < rc.max_items:
            waiting = [(c, b) for c, b in self.pool.values() if c.id not in self.tried and not self.closed(b)]
            if not waiting or self.budget <= 0:
                return
            level = min(self.rank[c.id] for c, _ in waiting)
            for c, box in sorted((cb for cb in waiting if self.rank[cb[0].id] == level), key=lambda cb: -cb[0].score):
                if self.budget <= 0:
                    break
                feats, where = more.idx.features(c.key), self.features_of(box)
                n, h = match_homography(where, feats, rc) if feats is not None else (0, None)
                self.tried[c.id] = (n, h, where)
                self.budget -= 1
            self.accept_verified()

    def accept_verified(self) -> None:
        """Accept the items the candidates verified so far show, most verified points first."""
        rc, more = self.rc, self.more
        while len(self.items) < rc.max_items:
            verified = [c.with_inliers(self.tried[c.id][0]) for c, _ in self.pool.values() if c.id in self.tried]
            ok = sorted((c for c in verified if c.inliers >= more.accept_inliers), key=lambda c: -c.inliers)
            if not ok:
                return
            best = ok[0]
            n, h, where = self.tried[best.id]
            quad = region(where, more.idx.features(best.key), h)
            self.pool.pop(best.id)
            self.dropped.add(best.id)
            if not sane(quad, self.quads) or not more.accept(best, verified):
                continue
            self.items.append(replace(best, quad=quad))
            self.quads.append(quad)
            self.named.add(best.id)
            for c in ok[1:]:  # those whose outline reaches onto the new item verified on it, perhaps: again on the rest
                n_c, h_c, where_c = self.tried[c.id]
                outline = region(where_c, more.idx.features(c.key), h_c)
                if outline is None or not _convex(outline) or overlap(outline, quad) > 0.0:
                    self.tried.pop(c.id, None)
