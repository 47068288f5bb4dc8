"""ONE lookup: RGB frame (or image bytes) → descriptor → candidates. The camera loop, the CLI ``query`` and
``POST /api/query`` all call this, so a benchmark of the CLI measures exactly what the camera does."""
from __future__ import annotations

import time

import numpy as np

from .camera import DEFAULT_MAX_PIXELS, decode_image
from .results import Candidate, LookupResult


class Lookup:
    """Wraps the shared encoder and index holder. ``index`` is anything with ``query(vector, top_k)``
    (an IndexHolder swaps generations underneath without the caller noticing)."""

    def __init__(self, encoder, index, *, top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.encoder = encoder
        self.index = index
        self.top_k = top_k
        self.max_pixels = max_pixels

    def search(self, vector: np.ndarray, top_k: int | None = None) -> list[Candidate]:
        """Nearest catalog items of a descriptor, best first."""
        return self.index.query(vector, top_k or self.top_k)

    def lookup_rgb(self, rgb: np.ndarray, *, source: str = "cli", top_k: int | None = None,
                   timings: dict[str, float] | None = None) -> LookupResult:
        """RGB uint8 HxWx3 → ranked candidates, with encode/search timings in milliseconds."""
        timings = dict(timings or {})
        t0 = time.perf_counter()
        vector = self.encoder.embed(rgb)
        t1 = time.perf_counter()
        results = self.search(vector, top_k)
        t2 = time.perf_counter()
        timings["encode"] = (t1 - t0) * 1e3
        timings["search"] = (t2 - t1) * 1e3
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return LookupResult(results=results, timings_ms=timings, source=source)

    def lookup_bytes(self, data: bytes, *, source: str = "upload", top_k: int | None = None) -> LookupResult:
        """Encoded image bytes (JPEG/PNG/…) → ranked candidates; raises ImageError for bad images."""
        t0 = time.perf_counter()
        rgb = decode_image(data, self.max_pixels)
        decode_ms = (time.perf_counter() - t0) * 1e3
        return self.lookup_rgb(rgb, source=source, top_k=top_k, timings={"decode": decode_ms})
