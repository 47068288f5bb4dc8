"""The recorder: where every lookup ends up (camera, button, upload) — the latest result, the history with its
snapshot, the metrics, the event sinks (MQTT, webhook) and the page's event stream — and what the status panel
counts (lookups in the last minute, the last error, a summary line in the log every ``history.summary_interval_s``).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from edge_retrieval.core.config import HistoryConfig, MqttConfig
from edge_retrieval.core.errors import ApplianceError
from edge_retrieval.core.results import LookupResult
from edge_retrieval.core.status import ErrorInfo, Health
from edge_retrieval.outputs.history import History
from edge_retrieval.outputs.metrics import Metrics
from edge_retrieval.outputs.push import PushHub

if TYPE_CHECKING:
    from edge_retrieval.outputs.sinks import EventSink

log = logging.getLogger(__name__)


class Recorder:
    """Thread-safe enough for its callers: one reference store for the latest result, counters that only grow."""

    def __init__(self, metrics: Metrics, push: PushHub, *, history: History | None, sinks: Sequence[EventSink],
                 history_config: HistoryConfig, mqtt: MqttConfig):
        """``history_config.summary_interval_s``: the INFO summary line; ``mqtt.state_interval_s``: how often the
        health goes to every sink."""
        self.metrics = metrics
        self.push = push
        self.history = history
        self.sinks = tuple(sinks)
        self.summary_interval_s = history_config.summary_interval_s
        self.sink_interval_s = mqtt.state_interval_s
        for sink in self.sinks:
            sink.register_metrics(metrics)
        self.latest: LookupResult | None = None
        self.last_error: ErrorInfo | None = None
        self._recent_s: deque[float] = deque()  # monotonic times of the last minute's lookups
        self._summary = {"lookups": 0, "matches": 0, "errors": 0}
        self._summary_at = time.monotonic()
        self._sink_health_at = 0.0
        self._sink_key: object = None  # what changed() said when the health last went to the sinks

    def started(self, source: str, timestamp: float) -> None:
        """A lookup began (the page shows it at once: ``lookup_started``)."""
        self.push.publish("lookup_started", {"source": source, "timestamp": timestamp})

    def run(self, source: str, look_up: Callable[[], tuple[LookupResult, np.ndarray]], *,
            started_at: float | None = None) -> LookupResult:
        """One lookup from start to record, for the camera loop and uploads alike: the page hears it started,
        ``look_up()`` gives (result, photo), a refused one (ApplianceError) is counted and raised again — as the
        device's last error only when the device's own lookup failed: a visitor's bad upload is told to that
        visitor (the HTTP answer), not shown as the device's trouble — a finished one is recorded."""
        self.started(source, time.time() if started_at is None else started_at)
        try:
            result, rgb = look_up()
        except ApplianceError as e:
            self.count_error(type(e).__name__, str(e), device=source != "upload")
            raise
        self.record(result, rgb)
        return result

    def record(self, result: LookupResult, rgb: np.ndarray | None = None) -> None:
        """Every lookup passes here: latest result, history (with a snapshot of ``rgb``), metrics, sinks, page."""
        self.latest = result  # one reference store: atomic
        entry = self.history.record(result, rgb) if self.history is not None else None
        self.push.publish("lookup_finished", entry if entry is not None else result)
        self._recent_s.append(time.monotonic())
        self._summary["lookups"] += 1
        self._summary["matches"] += result.match is not None
        self.metrics.lookups.labels(result.source).inc()
        self.metrics.outcomes.labels(result.decision).inc()
        self.metrics.lookup_ms.inc(result.timings_ms.get("total", 0.0))
        for sink in self.sinks:  # sinks only queue the event: they never block or raise
            sink.publish_lookup(result)

    def count_error(self, kind: str, message: str | None = None, *, device: bool = True) -> None:
        """A failed lookup or a refused request: counted by kind; shown as the device's last error when it is the
        device's (``device``), not a visitor's (a bad or refused upload)."""
        self.metrics.errors.labels(kind).inc()
        self._summary["errors"] += 1
        if device:
            self.last_error = ErrorInfo(kind=kind, message=message or kind, timestamp=time.time())

    def lookups_per_min(self) -> int:
        """Lookups recorded in the last 60 s."""
        now = time.monotonic()
        with contextlib.suppress(IndexError):  # another thread (a request, the push hub) may pop it first
            while self._recent_s and now - self._recent_s[0] > 60.0:
                self._recent_s.popleft()
        return len(self._recent_s)

    def tick(self, health: Callable[[], Health], changed: Callable[[], object] = lambda: None) -> None:
        """Called every turn of the camera loop: the health to the sinks every ``mqtt.state_interval_s`` (a dead
        camera is reported too), and at once when ``changed()`` (something cheap: the camera's state, the index
        generation) differs from the last time it went out — so Home Assistant sees the camera stream the moment
        it does, not one interval later; and the summary line every ``history.summary_interval_s``."""
        now = time.monotonic()
        key = changed() if self.sinks else None
        if self.sinks and (now - self._sink_health_at >= self.sink_interval_s or key != self._sink_key):
            self._sink_health_at, self._sink_key = now, key
            current = health()
            for sink in self.sinks:
                sink.publish_health(current)
        if now - self._summary_at >= self.summary_interval_s:
            s, self._summary = self._summary, {"lookups": 0, "matches": 0, "errors": 0}
            log.info("last %.0f s: %d lookups, %d matches, %d errors", now - self._summary_at, s["lookups"],
                     s["matches"], s["errors"])
            self._summary_at = now

    def close(self) -> None:
        """Stop the sinks (MQTT says "offline") and close the history (idempotent)."""
        for sink in self.sinks:
            sink.stop()
        if self.history is not None:
            self.history.close()
