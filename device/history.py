"""Recent lookups: the last ``history.size`` LookupResults in memory, each with a small JPEG snapshot of what was
looked up (the camera frame or the uploaded photo) in a bounded folder, for the page's "Recent lookups" strip and
``GET /api/history`` (JSON, CSV, snapshots).

The snapshot is encoded once, at ``history.snapshot_px``, when the lookup is recorded; the oldest entry and its
file go when a new one comes. The folder is emptied at start: the history is a view of this run, not an archive.
A folder that cannot be written is logged once and the history goes on without snapshots."""
from __future__ import annotations

import csv
import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import HistoryConfig
from .errors import ImageError
from .images import make_thumbnail
from .results import LookupResult

log = logging.getLogger(__name__)

_SNAPSHOT_GLOB = "lookup-*.jpg"
_RETRY_WRITE_S = 30.0  # after a failed snapshot (a full disk) try again this much later: space may come back
CSV_COLUMNS = ("n", "time_utc", "source", "decision", "match_id", "match_label", "inliers", "rank_score", "score",
               "candidates", "total_ms")


@dataclass(frozen=True)
class Entry:
    """One recorded lookup: its sequence number ``n`` (1, 2, … in this run), the result, and whether a
    snapshot file was kept."""

    n: int
    result: LookupResult
    has_image: bool

    def to_json(self) -> dict:
        """The LookupResult's JSON with ``n``, ``decision`` ("match" | "no match") and ``has_image``."""
        body = self.result.to_json()
        return {"n": self.n, "decision": "match" if self.result.match is not None else "no match",
                "has_image": self.has_image, **body}


class History:
    """Bounded, thread-safe store of recent lookups (see the module docstring)."""

    def __init__(self, config: HistoryConfig):
        self.config = config
        self._entries: deque[Entry] = deque()
        self._lock = threading.Lock()
        self._n = 0
        self._write_again_at = 0.0  # monotonic time from which snapshots are tried again
        try:
            config.dir.mkdir(parents=True, exist_ok=True)
            for old in config.dir.glob(_SNAPSHOT_GLOB):
                old.unlink()
        except OSError as e:
            self._cannot_write(e)

    def _cannot_write(self, e: OSError) -> None:
        log.warning("history: cannot write snapshots to %s (%s); keeping lookups without them, trying again in "
                    "%g s", self.config.dir, e.strerror or e, _RETRY_WRITE_S)
        self._write_again_at = time.monotonic() + _RETRY_WRITE_S

    def _path(self, n: int) -> Path:
        return self.config.dir / f"lookup-{n:08d}.jpg"

    def record(self, result: LookupResult, rgb: np.ndarray | None = None) -> int:
        """Keep ``result`` (and a snapshot of ``rgb``, the image it was made from); returns its number."""
        jpeg = None
        if rgb is not None and time.monotonic() >= self._write_again_at:
            try:
                jpeg = make_thumbnail(rgb, self.config.snapshot_px)
            except ImageError as e:
                log.debug("history: no snapshot (%s)", e)
        with self._lock:
            self._n += 1
            n = self._n
            if jpeg is not None:
                try:
                    self._path(n).write_bytes(jpeg)
                except OSError as e:
                    self._path(n).unlink(missing_ok=True)  # no half-written snapshot left behind
                    self._cannot_write(e)
                    jpeg = None
            self._entries.append(Entry(n, result, jpeg is not None))
            while len(self._entries) > self.config.size:
                gone = self._entries.popleft()
                if gone.has_image:
                    self._path(gone.n).unlink(missing_ok=True)
        return n

    def entries(self) -> list[Entry]:
        """The kept lookups, newest first."""
        with self._lock:
            return list(reversed(self._entries))

    def image(self, n: int) -> bytes | None:
        """The JPEG snapshot of lookup ``n``; None when it is gone or has none."""
        with self._lock:
            if not any(e.n == n and e.has_image for e in self._entries):
                return None
            try:
                return self._path(n).read_bytes()
            except OSError:
                return None

    def to_csv(self) -> str:
        """The kept lookups as CSV (newest first), one row each; ``candidates`` is ``id:rank_score`` joined by
        spaces."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for entry in self.entries():
            r, m = entry.result, entry.result.match
            top = m if m is not None else (r.results[0] if r.results else None)
            writer.writerow([
                entry.n, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.timestamp)), r.source,
                "match" if m is not None else "no match", _cell(m.id) if m else "", _cell(m.label) if m else "",
                "" if top is None or top.inliers is None else top.inliers,
                "" if top is None else top.to_json()["rank_score"], "" if top is None else round(top.score, 4),
                _cell(" ".join(f"{c.id}:{c.to_json()['rank_score']}" for c in r.results)),
                round(r.timings_ms.get("total", 0.0), 1)])
        return out.getvalue()


def _cell(text: str) -> str:
    """A CSV cell that a spreadsheet shows as text: labels are typed by whoever enrols, and a cell starting with
    = + - @ would be run as a formula by Excel or LibreOffice."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text
