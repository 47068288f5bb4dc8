"""The result of one lookup, shared by the CLI, the camera loop and the web API (one JSON shape)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One catalog item returned by a lookup. ``score`` is the cosine similarity (1 = identical)."""

    id: str
    label: str
    score: float

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label, "score": round(float(self.score), 4)}


@dataclass
class LookupResult:
    """Ranked candidates of one query plus where the time went (milliseconds per stage)."""

    results: list[Candidate]
    timings_ms: dict[str, float]
    source: str = "cli"  # "camera" | "upload" | "cli"
    timestamp: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {
            "results": [c.to_json() for c in self.results],
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "source": self.source,
            "timestamp": self.timestamp,
        }
