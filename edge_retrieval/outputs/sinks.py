"""Where lookups go besides the page: the sink protocol, the one lookup event and the queue worker that MQTT
(edge_retrieval/outputs/mqtt.py) and the webhook (edge_retrieval/outputs/webhook.py) share. Events out of the device: MQTT (lookup events, retained state, Home Assistant discovery, the "look up now"
button) and an optional webhook for systems without MQTT.

Both are "sinks" the appliance hands each recorded lookup to (``publish_lookup``) and, every few seconds, its
health (``publish_health``). Neither may slow or fail a lookup: a sink only serialises the event and puts it
on a bounded queue that its own thread drains; a full queue drops the event and counts it. A broker that is
down or refuses the credentials, or a webhook that times out, is logged and counted, never raised.
Only ids, labels, scores and timings leave the device — never a frame.
"""
from __future__ import annotations

import logging
import queue
import re
import socket
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Protocol

from edge_retrieval.core.results import LookupResult
from edge_retrieval.core.status import Health

log = logging.getLogger(__name__)

# How long stop() waits for queued events to go out before giving up on them.
DRAIN_S = 2.0
# The worker wakes this often to notice stop() while it waits for a queue item or a connection.
POLL_S = 0.2


class EventSink(Protocol):
    """What the appliance calls; implemented by MqttPublisher and WebhookNotifier."""

    def publish_lookup(self, result: LookupResult) -> None: ...

    def publish_health(self, health: Health) -> None: ...

    def register_metrics(self, metrics) -> None: ...

    def stop(self) -> None: ...


def default_device_id() -> str:
    """This machine's host name, reduced to what MQTT topics and Home Assistant ids accept."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-") or "edge-retrieval"


def lookup_event(result: LookupResult, device_id: str) -> dict:
    """The JSON event of one lookup, the same for MQTT and the webhook: the decision, the matched item (the best
    one, with its attributes), every item in the frame (``matches``, best first, and their number ``items``) and the candidates' ids
    and scores — never the frame."""
    m = result.match
    return {
        "device": device_id,
        "decision": result.decision,
        "id": m.id if m is not None else None,
        "label": m.label if m is not None else None,
        "score": round(float(m.score), 4) if m is not None else None,
        "inliers": m.inliers if m is not None else None,
        "attributes": dict(m.attributes) if m is not None else {},  # the item's (sku, price, …)
        "items": len(result.matches),  # catalog items in view (Home Assistant's "items in view")
        "matches": [_item(c) for c in result.matches],  # every item in the frame, best first
        "candidates": [c.to_json() for c in result.results],
        "source": result.source,
        "timings_ms": {k: round(float(v), 2) for k, v in result.timings_ms.items()},
        "time": datetime.fromtimestamp(result.timestamp, timezone.utc).isoformat(timespec="milliseconds"),
    }


def _item(c) -> dict:
    """One item of a lookup event: id, label, attributes, score, inliers, the photo that matched (when not the item's
    first) and where it lies in the frame (quad)."""
    d = c.to_json()
    return {k: d[k] for k in ("id", "label", "attributes", "photo", "score", "inliers", "quad") if k in d}


class QueueWorker:
    """A bounded queue drained by one daemon thread: ``_offer`` never blocks; a full queue drops and counts."""

    def __init__(self, name: str, size: int):
        self._name = name
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self._counts: Counter = Counter()

    def _handle(self, item) -> None:
        raise NotImplementedError

    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def _counted(self) -> Counter:
        with self._counts_lock:
            return Counter(self._counts)

    def _offer(self, item) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self._count("dropped")
            return False

    def _start_worker(self) -> None:
        if self._thread is None:
            self._halt.clear()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _stop_worker(self, drain_s: float) -> None:
        deadline = time.monotonic() + drain_s
        while self._thread is not None and not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_s + 1)
            self._thread = None
        left = 0
        while True:  # whatever could not go out in time is dropped, and counted as such
            try:
                self._queue.get_nowait()
                left += 1
            except queue.Empty:
                break
        if left:
            self._count("dropped", left)

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                self._handle(item)
            except Exception:
                self._count("dropped")
                log.exception("%s: an event could not be sent", self._name)
