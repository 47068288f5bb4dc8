"""The result of one lookup, shared by the CLI, the camera loop and the web API (one JSON shape)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from edge_retrieval.core.photos import photo_key, split_key


@dataclass(frozen=True)
class Candidate:
    """One catalog item returned by a lookup. ``score`` is the cosine similarity (1 = identical) of the
    global descriptors; ``inliers`` the spatially verified matching points (None: not verified);
    ``rank_score`` what the candidates are ranked by (the cosine fused with the inliers; None = the cosine);
    ``quad`` where the verified item lies in the query frame (four (x, y) corners, fractions 0..1); ``photo`` the
    entry key of the item's photo that scored (edge_retrieval/core/photos.py; None: its first photo);
    ``attributes`` the item's (from the labels file or the enrolment)."""

    id: str
    label: str
    score: float
    inliers: int | None = None
    rank_score: float | None = None
    quad: tuple[tuple[float, float], ...] | None = None
    photo: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_entry(cls, key: str, label: str, score: float, attributes: dict[str, str] | None = None) -> Candidate:
        """The candidate of the index entry ``key`` (one photo of an item): the item's id, and the photo's key."""
        item_id, photo = split_key(key)
        return cls(item_id, label, score, photo=key if photo else None, attributes=dict(attributes or {}))

    @property
    def key(self) -> str:
        """The index entry this candidate's score, features and thumbnail come from."""
        return self.photo or self.id

    def to_json(self) -> dict:
        """The JSON shape: ``score`` stays the cosine (API compatibility); ``rank_score`` is the ranking score;
        ``photo`` the name of the item's photo that matched, when it is not the item's first."""
        d = {"id": self.id, "label": self.label, "score": round(float(self.score), 4),
             "rank_score": round(float(self.score if self.rank_score is None else self.rank_score), 4),
             "attributes": dict(self.attributes)}
        if self.photo is not None:
            d["photo"] = split_key(self.photo)[1]
        if self.inliers is not None:
            d["inliers"] = int(self.inliers)
        if self.quad is not None:
            d["quad"] = [list(corner) for corner in self.quad]
        return d

    def with_inliers(self, inliers: int | None) -> Candidate:
        return replace(self, inliers=inliers)

    @classmethod
    def from_json(cls, d: dict) -> Candidate:
        """The candidate back from :meth:`to_json` (scores as rounded there)."""
        quad, photo = d.get("quad"), d.get("photo")
        return cls(str(d["id"]), str(d["label"]), float(d["score"]), d.get("inliers"), d.get("rank_score"),
                   tuple(tuple(corner) for corner in quad) if quad is not None else None,
                   photo_key(str(d["id"]), str(photo)) if photo else None,
                   {str(k): str(v) for k, v in (d.get("attributes") or {}).items()})


# A match verified by at least this many matching points (RANSAC inliers of one homography) is as sure as the
# device gets; the decision accepts from 8 (the bundles' calibration), where a wrong item is rare but possible.
SURE_POINTS = 20


def confidence(candidate: Candidate, match: Candidate | None) -> str:
    """The one word for how sure a lookup is of an item, the same on the page, in the CLI and the JSON: "high"
    (the match, verified by ≥ ``SURE_POINTS`` matching points), "medium" (the match, on less evidence: fewer
    points, or the cosine alone), "low" (not the match). The numbers behind it (cosine, points) stay beside it."""
    if match is None or candidate.id != match.id:
        return "low"
    return "high" if (candidate.inliers or 0) >= SURE_POINTS else "medium"


@dataclass
class LookupResult:
    """Ranked candidates of one query, the decision (``match``: the accepted item, or None = "no match"),
    and where the time went (milliseconds per stage). ``matches``: every item accepted in the frame, best first
    (``match`` is the first; empty = "no match"); left empty by a caller that names one item, it is ``[match]``."""

    results: list[Candidate]
    timings_ms: dict[str, float]
    source: str = "cli"  # "camera" (trigger) | "requested" ("Look up now") | "upload" | "cli"
    timestamp: float = field(default_factory=time.time)
    match: Candidate | None = None
    matches: list[Candidate] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.matches and self.match is not None:
            self.matches = [self.match]

    @property
    def decision(self) -> str:
        """The one spelling of the outcome: "match" or "no_match" (history, CSV, MQTT events, metrics)."""
        return "match" if self.match is not None else "no_match"

    def to_json(self) -> dict:
        """The JSON shape; each candidate (and the match) with its ``confidence`` word."""
        accepted = {m.id: m for m in self.matches or ([self.match] if self.match is not None else [])}

        def rated(c: Candidate) -> dict:  # every item found in the frame is "the match" for its own word
            return {**c.to_json(), "confidence": confidence(c, accepted.get(c.id))}

        return {
            "match": rated(self.match) if self.match is not None else None,
            "matches": [rated(c) for c in self.matches],
            "results": [rated(c) for c in self.results],
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "source": self.source,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_json(cls, d: dict) -> LookupResult:
        """The result back from :meth:`to_json` (the lookup history keeps it so across restarts)."""
        match = d.get("match")
        return cls([Candidate.from_json(c) for c in d.get("results", [])],
                   {str(k): float(v) for k, v in (d.get("timings_ms") or {}).items()}, str(d.get("source", "cli")),
                   float(d["timestamp"]), Candidate.from_json(match) if match is not None else None,
                   [Candidate.from_json(c) for c in d.get("matches") or []])  # older entries: [match]
