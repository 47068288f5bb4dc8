"""ONE lookup: RGB frame (or image bytes) → descriptor(s) → candidates → (spatial verification) → match or
"no match". The camera loop, the CLI ``query`` and ``POST /api/query`` all call this, so a benchmark of the
CLI measures exactly what the camera does."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Protocol

import numpy as np

from edge_retrieval.core.config import (
    NORM_K,
    UNCALIBRATED_ACCEPT_INLIERS,
    UNCALIBRATED_ACCEPT_SCORE,
    DecisionModel,
    ImagesConfig,
    RecognitionConfig,
)
from edge_retrieval.core.errors import ConfigError
from edge_retrieval.core.results import Candidate, LookupResult
from edge_retrieval.imaging.codec import decode_image
from edge_retrieval.index.reader import CatalogIndex
from edge_retrieval.model.bundle import load_background
from edge_retrieval.model.local_features import Verification, extract, outline, verify_candidates
from edge_retrieval.search.decision import accepts, background_level
from edge_retrieval.search.multi_item import MoreItems


class IndexSource(Protocol):
    """What a lookup reads: the generation to use for one whole query (a loaded ``CatalogIndex`` is its
    own; the appliance's ``IndexHolder`` hands out whichever is live)."""

    def current(self) -> CatalogIndex:
        """The generation to query."""
        ...


def centre_crop(rgb: np.ndarray, frac: float) -> np.ndarray:
    """The central ``frac`` × ``frac`` part of a frame (where the user holds the object)."""
    h, w = rgb.shape[:2]
    ch, cw = max(1, int(h * frac)), max(1, int(w * frac))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw])


def resolve_decision(rc: RecognitionConfig, calibration) -> tuple[DecisionModel | None, int, float]:
    """(learned decision or None, accept_inliers, accept_score) of a lookup: what the config sets, else the
    bundle's calibration (cosines of different descriptors live on different scales), else the uncalibrated rule."""
    decision = rc.decision if rc.decision != "bundle" else (calibration.decision if calibration else None)
    inliers = rc.accept_inliers if rc.accept_inliers is not None else (
        calibration.accept_inliers if calibration else UNCALIBRATED_ACCEPT_INLIERS)
    score = rc.accept_score if rc.accept_score is not None else (
        calibration.accept_score if calibration else UNCALIBRATED_ACCEPT_SCORE)
    return decision, inliers, score


class Lookup:
    """Wraps the shared encoder and index. ``index`` is a loaded CatalogIndex or the appliance's
    IndexHolder (swapped on enrolment); one lookup uses one generation throughout."""

    def __init__(self, encoder, index: IndexSource, recognition: RecognitionConfig, *, top_k: int,
                 images: ImagesConfig = ImagesConfig()):
        """``top_k``: results per lookup (``index.top_k``, or the CLI's ``--top-k``); ``images``: what an uploaded
        image may decode to."""
        self.encoder = encoder
        self.index = index
        self.recognition = recognition
        self.top_k = top_k
        self.images = images
        self.decision, self.accept_inliers, self.accept_score = resolve_decision(recognition, encoder.manifest.calibration)
        # the decision's fixed background set (score_bg), projected once per adapted generation
        self._background = load_background(encoder.bundle_dir, encoder.manifest)
        self._projected: tuple[object, np.ndarray] | None = None
        # a lookup measures the query's background level only for a decision that reads it (a matrix product and,
        # adapted, a projection a lookup: no work for the threshold rule or a model on other features)
        self._uses_bg = self.decision is not None and "score_bg" in self.decision.features
        if self._uses_bg and self._background is None:
            raise ConfigError(f"recognition.decision uses score_bg, but bundle {encoder.manifest.name} ships no "
                              "background set (python -m benchmarks background --write-bundle)")

    def verification_status(self) -> dict:
        """Whether verification runs, and why not (for /api/health)."""
        idx = self.index.current()
        if not self.recognition.verify:
            return {"enabled": False, "why": "recognition.verify is false in the config"}
        if not idx.has_features:
            return {"enabled": False, "why": idx.features_error or "the index has no local features"}
        return {"enabled": True, "top_k": self.recognition.verify_top_k,
                "accept_inliers": self.accept_inliers,
                "decision": "learned" if self.decision is not None else "thresholds"}

    def lookup_rgb(self, rgb: np.ndarray, *, source: str = "cli", top_k: int | None = None,
                   timings: dict[str, float] | None = None) -> LookupResult:
        """RGB uint8 HxWx3 → ranked candidates and the decision, with per-stage timings in milliseconds.

        When the whole frame gives no match and ``recognition.retry_crops`` is set, the lookup looks closer: the
        centre crops are encoded too, their candidates join the list (an item keeps its best cosine), the new
        ones are verified with the same query keypoints, and the decision is taken again. A print small in the
        frame then costs one more encode; a lookup that matched at once costs nothing more."""
        rc = self.recognition
        top_k = top_k or self.top_k
        idx = self.index.current()
        timings = dict(timings or {})
        want = max(top_k, rc.verify_top_k if rc.verify else 0, NORM_K)  # NORM_K: the decision's score_norm
        best: dict[str, Candidate] = {}  # item id → its best photo's candidate; alt: its second photo's
        alt: dict[str, Candidate] = {}
        verified: dict[str, tuple[Verification, str]] = {}  # item id → its best verification, of which photo
        query: list = [None]  # the query's keypoints, extracted once, on the first verification
        bg: list[float | None] = [None]  # the whole frame's background level (score_bg), on the first search

        def attempt(images: list[np.ndarray]) -> tuple[list[Candidate], Candidate | None]:
            ranked = self._search(images, idx, want, best, alt, timings, bg)
            if rc.verify and ranked and idx.has_features and ranked[0].score < rc.verify_below_score:
                t0 = time.perf_counter()
                query[0] = query[0] if query[0] is not None else extract(rgb, rc, query=True)
                ranked = self._verify(query[0], ranked, idx, verified, alt)
                timings["verify"] = timings.get("verify", 0.0) + (time.perf_counter() - t0) * 1e3
            return ranked, self._decide(ranked, bg[0])

        ranked, match = attempt([rgb] + [centre_crop(rgb, f) for f in rc.query_crops])
        if match is None and rc.retry_crops:
            # the merged list (whole frame + crops) ranks a small print better even where no item is accepted
            ranked, match = attempt([centre_crop(rgb, f) for f in rc.retry_crops])
        matches = [match] if match is not None else []
        if rc.multi_item and rc.max_items > 1 and rc.verify and idx.has_features and ranked:
            t0 = time.perf_counter()
            query[0] = query[0] if query[0] is not None else extract(rgb, rc, query=True)
            timings["verify"] = timings.get("verify", 0.0) + (time.perf_counter() - t0) * 1e3
            by_score = self.accept_score if self.decision is None and rc.multi_by_score else None
            more = MoreItems(rc, idx, self.encoder.embed_batch, self.accept_inliers, by_score,
                             lambda item, verified: self._accept_more(item, verified, bg[0]))
            matches = more.find(rgb, query[0], match, ranked, timings)
            match = matches[0] if matches else None
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return LookupResult(results=ranked[:top_k], timings_ms=timings, source=source, match=match, matches=matches)

    def _search(self, images: list[np.ndarray], idx: CatalogIndex, want: int, best: dict[str, Candidate],
                alt: dict[str, Candidate], timings: dict[str, float], bg: list[float | None]) -> list[Candidate]:
        """Encode ``images`` and merge their nearest items into ``best`` (an item's score is the max over the
        images, over its photos and inside the index over each photo's views; ``alt`` keeps an item's second-best
        photo for verification); the ``want`` best items so far, best first. ``bg[0]``: the first image's (the
        whole frame's) background level, set on the first call when the decision reads score_bg."""
        t0 = time.perf_counter()
        vectors = [self.encoder.embed(image) for image in images]
        t1 = time.perf_counter()
        entries = want * 2 if idx.size > idx.item_count else want  # several photos of an item take places
        if bg[0] is None and self._uses_bg and vectors:
            bg[0] = self._background_level(vectors[0], idx)
        for v in vectors:
            for c in idx.query(v, entries):
                old = best.get(c.id)
                if old is None or c.score > old.score:
                    best[c.id] = c
                    c = old
                if c is not None and c.key != best[c.id].key and (c.id not in alt or c.score > alt[c.id].score):
                    alt[c.id] = c
        t2 = time.perf_counter()
        timings["encode"] = timings.get("encode", 0.0) + (t1 - t0) * 1e3
        timings["search"] = timings.get("search", 0.0) + (t2 - t1) * 1e3
        return sorted(best.values(), key=lambda c: -c.score)[:want]

    def _verify(self, query, ranked: list[Candidate], idx: CatalogIndex,
                verified: dict[str, tuple[Verification, str]], alt: dict[str, Candidate]) -> list[Candidate]:
        """Verify the top ``verify_top_k`` items not verified yet (``verified`` remembers them across a retry)
        against their best photo and, when the item has one, its second-best (a box's other side): the photo with
        more verified points speaks for the item. Re-rank them by the fused score, outline the top one when it
        verifies."""
        rc = self.recognition
        head, tail = ranked[:rc.verify_top_k], ranked[rc.verify_top_k:]
        todo = [p for c in head if c.id not in verified for p in ([c, alt[c.id]] if c.id in alt else [c])]
        found = verify_candidates(query, todo, lambda c: idx.features(c.key), rc, stop_inliers=rc.stop_inliers,
                                  accept_inliers=self.accept_inliers)
        for c, v in zip(todo, found):
            if c.id not in verified or v[0] > verified[c.id][0][0]:
                verified[c.id] = (v, c.key)
        cap = max(rc.stop_inliers, 1)

        def fused(c: Candidate) -> float:
            return c.score + rc.fusion_weight * min(c.inliers or 0, cap) / cap

        def of_photo(c: Candidate) -> Candidate:
            (n, *_), key = verified[c.id]
            return replace(c, inliers=n if n >= 0 else None, photo=key if key != c.id else None)

        head = sorted((replace(c, rank_score=fused(c)) for c in map(of_photo, head)), key=lambda c: -c.rank_score)
        top = head[0]
        if top.inliers is not None and top.inliers >= self.accept_inliers:  # the page outlines a verified match
            head[0] = replace(top, quad=outline(query, idx.features(top.key), verified[top.id][0]))
        return head + tail

    def _background_level(self, vector: np.ndarray, idx: CatalogIndex) -> float:
        """The query's background level in the space ``idx`` scores in (its catalog projection, if any)."""
        proj = idx.projection
        if proj is None:
            return background_level(vector, self._background)
        if self._projected is None or self._projected[0] is not proj:
            self._projected = (proj, proj.apply(self._background))
        return background_level(proj.apply(vector), self._projected[1])

    def _decide(self, ranked: list[Candidate], background: float | None = None) -> Candidate | None:
        """Accept the top item only when the evidence says so; else "no match". A verified lookup is decided by
        the learned model when one is configured; otherwise (or when nothing was verified: verification off, an
        index without features) by the two thresholds, since the model's inlier features would all be zero."""
        if not ranked:
            return None
        top, model = ranked[0], self.decision
        if model is not None and any(c.inliers is not None for c in ranked):
            return top if accepts(model, ranked, background) else None
        if top.inliers is not None and top.inliers >= self.accept_inliers:
            return top
        if top.score >= self.accept_score:
            return top
        return None

    def _accept_more(self, item: Candidate, verified: list[Candidate], background: float | None = None) -> bool:
        """The decision for one more item of a frame (it has ``accept_inliers`` already): the learned model, when
        one is configured, over the item and the others verified on the same remaining keypoints."""
        if self.decision is None:
            return True
        return accepts(self.decision, [item] + sorted((c for c in verified if c.id != item.id),
                                                      key=lambda c: -c.score), background)

    def decode_side_px(self) -> int:
        """How large an image must stay when decoded: the model input, or ORB's working size when verifying
        or enrolling with features (decoding no larger bounds the memory of a request)."""
        spec, rc = self.encoder.manifest.input, self.recognition
        need = spec.min_side_px
        return max(need, rc.features_max_side_px) if (rc.verify or rc.features) else need

    def lookup_bytes(self, data: bytes, *, source: str = "upload", top_k: int | None = None) -> LookupResult:
        """Encoded image bytes (JPEG/PNG/…) → ranked candidates; raises ImageError for bad images."""
        rgb, decode_ms = self.decode(data)
        return self.lookup_rgb(rgb, source=source, top_k=top_k, timings={"decode": decode_ms})

    def decode(self, data: bytes) -> tuple[np.ndarray, float]:
        """Encoded image bytes → (RGB uint8 HxWx3 no larger than a lookup needs, milliseconds it took); raises
        ImageError. The appliance decodes an upload once and keeps the RGB for its history snapshot."""
        t0 = time.perf_counter()
        rgb = decode_image(data, self.images.max_pixels, min_side_px=self.decode_side_px())
        return rgb, (time.perf_counter() - t0) * 1e3
