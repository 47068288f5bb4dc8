"""What the page is told instead of asking: a hub that fans the appliance's events out to the open Server-Sent
Events streams (``GET /api/events``, edge_retrieval/web/sse.py).

Kinds: ``lookup_started`` (a lookup began: its source), ``lookup_finished`` (the history entry, or the result
without a history), ``status`` (the ``/api/status`` document, sent when a part the page shows changed, checked
every ``sse.status_check_s`` by one thread while a stream is open) and ``catalog_changed`` (the index's size or
generation changed: an enrolment, a removal, a generation another process made live).

Publishing never blocks and never raises: each stream has its own bounded queue (``sse.queue_size``); a
stream whose client stopped reading fills it and is ended (its client reconnects and gets the status afresh),
so a slow or stuck page costs the lookup nothing. How many streams may be open is the web layer's business
(each holds a waitress thread)."""
from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from edge_retrieval.core.config import SseConfig
from edge_retrieval.core.status import Status

log = logging.getLogger(__name__)

KINDS = ("lookup_started", "lookup_finished", "status", "catalog_changed")


@dataclass(frozen=True)
class PushEvent:
    """One event: its ``kind`` (one of KINDS) and its data (a JSON-able dict; for ``lookup_finished`` the
    history Entry or the LookupResult, which the web layer renders with its URLs)."""

    kind: str
    data: Any


def status_digest(status: Status | None) -> tuple[Hashable, Hashable]:
    """(what the page shows, the catalog) of an ``/api/status`` document, coarse enough that a steady device
    sends nothing: camera state and whole fps, trigger armed, lookups in the last minute, whether one runs, the
    last error, CPU to 10 % and RSS to 10 MB, verification, the latest lookup; the catalog is the index's size
    and generation."""
    if status is None:
        return None, None

    def coarse(value, step: float):
        return None if value is None else round(float(value) / step)

    cam, proc = status.camera, status.process
    shown = json.dumps([cam.state, coarse(cam.fps, 1), cam.last_error, status.trigger.enabled, status.trigger.armed,
                        status.looking_up, status.lookups_per_min,
                        status.last_error.model_dump() if status.last_error else None,
                        coarse(proc.cpu_percent, 10), coarse(proc.rss_mb, 10), status.verification,
                        status.latest.model_dump()], sort_keys=True, default=str)
    return shown, (status.index.size, status.index.generation)


class Stream:
    """One client's subscription: a bounded queue of events. Ended by :meth:`close`, by the hub's close, or
    when its client fell ``sse.queue_size`` events behind."""

    def __init__(self, hub: PushHub, queue_size: int):
        self._hub = hub
        self._size = queue_size
        self._events: deque[PushEvent] = deque()
        self._ready = threading.Condition()
        self.ended: str | None = None  # why it ended: "closed" | "slow client" | "shutting down"

    def _put(self, event: PushEvent) -> bool:
        """Queue ``event``; True when this made the stream overflow (and so end)."""
        with self._ready:
            if self.ended is not None:
                return False
            self._ready.notify()
            if len(self._events) < self._size:
                self._events.append(event)
                return False
            self._events.clear()  # the client stopped reading: end it rather than wait for it
            self.ended = "slow client"
            return True

    def next(self, timeout_s: float) -> list[PushEvent] | None:
        """The events queued since the last call, waiting up to ``timeout_s`` for one ([] on timeout); None once
        the stream has ended."""
        with self._ready:
            if not self._events and self.ended is None:
                self._ready.wait(timeout_s)
            if self.ended is not None:
                return None
            out = list(self._events)
            self._events.clear()
            return out

    def close(self, why: str = "closed") -> None:
        """End the stream and leave the hub (idempotent)."""
        with self._ready:
            if self.ended is None:
                self.ended = why
            self._ready.notify()
        self._hub._leave(self)


class PushHub:
    """Fans events out to the open streams; watches the status for changes while any is open."""

    def __init__(self, config: SseConfig):
        """The status it watches is given by :meth:`watch` (the appliance, once it exists)."""
        self.config = config
        self._status: Callable[[], Status] | None = None
        self._streams: list[Stream] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self.slow_clients = 0  # streams ended because their client stopped reading

    def watch(self, status: Callable[[], Status]) -> None:
        """Send ``status()`` to each new stream first, and again whenever what the page shows of it changes."""
        self._status = status

    def open(self) -> Stream:
        """A new stream, its first event the current status (so a page that (re)connects is up to date)."""
        stream = Stream(self, self.config.queue_size)
        status = self._read_status()
        if status is not None:
            stream._put(PushEvent("status", status))
        with self._lock:
            if self._closed.is_set():
                stream.ended = "shutting down"
                return stream
            self._streams.append(stream)
            if self._status is not None and self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="push-status", daemon=True)
                self._watcher.start()
        return stream

    def publish(self, kind: str, data: Any) -> None:
        """Queue ``data`` as a ``kind`` event on every open stream; never blocks, never raises."""
        event = PushEvent(kind, data)
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            if stream._put(event):
                self.slow_clients += 1
                log.info("sse: a client stopped reading (%d events behind); its stream is closed",
                         self.config.queue_size)
                stream.close("slow client")

    def open_streams(self) -> int:
        """How many streams are open now."""
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        """End every stream (their clients see the end and reconnect, elsewhere or later)."""
        self._closed.set()
        with self._lock:
            streams, self._streams = list(self._streams), []
        for stream in streams:
            stream.close("shutting down")

    def _leave(self, stream: Stream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def _read_status(self) -> Status | None:
        if self._status is None:
            return None
        try:
            return self._status()
        except Exception:
            log.exception("sse: reading the status failed")
            return None

    def _watch(self) -> None:
        """While a stream is open: compare the status every ``status_check_s``; send it when what the page shows
        changed, and ``catalog_changed`` when the index did."""
        last = status_digest(self._read_status())
        while not self._closed.wait(self.config.status_check_s):
            with self._lock:
                if not self._streams:
                    self._watcher = None
                    return
            status = self._read_status()
            if status is None:
                continue
            digest = status_digest(status)
            if digest[0] != last[0] or digest[1] != last[1]:
                self.publish("status", status)
            if digest[1] != last[1]:
                self.publish("catalog_changed", status.index)
            last = digest
