"""The running appliance: camera → trigger → lookup → latest result, plus the Services the web app calls.

It owns no model code: it is handed the camera, the trigger, the shared Lookup and the IndexHolder by
``device/__main__.py`` (the one place that wires components)."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .camera import Camera, decode_image, encode_jpeg
from .catalog import EnrolledStore, Enrolment, make_item, validate_id
from .errors import ApplianceError, CatalogIndexError
from .index import IndexHolder
from .lookup import Lookup
from .results import LookupResult
from .trigger import Trigger

if TYPE_CHECKING:  # events (issue 14)
    from .events import EventSink

log = logging.getLogger(__name__)


class Appliance:
    """Implements ``device.web.Services`` and runs the camera loop in a thread."""

    def __init__(self, *, lookup: Lookup, holder: IndexHolder, camera: Camera | None, trigger: Trigger | None,
                 enrolled_dir: Path, enrolment: Enrolment = Enrolment(), stream_quality: int = 75,
                 sinks: Sequence["EventSink"] = (), sink_interval_s: float = 10.0):
        self.lookup = lookup
        self.holder = holder
        self.camera = camera
        self.trigger = trigger
        self.enrolled = EnrolledStore(enrolled_dir)
        self.enrolment = enrolment
        self.stream_quality = stream_quality
        self.started = time.time()
        self._latest: LookupResult | None = None
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._errors: Counter = Counter()
        self._outcomes: Counter = Counter()
        self._lookup_ms_sum = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._jpeg_cache: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()
        self._requested = threading.Event()
        # --- events (issue 14): each recorded lookup goes to every sink; health every sink_interval_s ---
        self.sinks = tuple(sinks)
        self.sink_interval_s = sink_interval_s
        self._sink_health_at = 0.0

    # ---- camera loop -------------------------------------------------------------------------------
    def start(self) -> "Appliance":
        """Start the camera and the loop that feeds triggered frames to the lookup."""
        if self.camera is not None:
            self.camera.start()
            self._thread = threading.Thread(target=self._loop, name="lookup-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and the camera (idempotent)."""
        self._stop.set()
        if self.camera is not None:
            self.camera.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.holder.close()

    def _loop(self) -> None:
        last_index = -1
        while not self._stop.is_set():
            self._publish_health_due()  # events (issue 14): before the frame wait, so a dead camera is reported too
            frame = self.camera.wait_frame(last_index, timeout_s=0.5)
            if frame is None:
                continue
            last_index = frame.index
            requested = self._requested.is_set()
            self._requested.clear()
            if self.trigger is None:
                reason = "requested" if requested else None
            else:
                if requested:
                    self.trigger.request()
                reason = self.trigger.update(frame.rgb, frame.timestamp)
            if reason is None:
                continue
            try:
                result = self.lookup.lookup_rgb(frame.rgb, source="camera")
            except ApplianceError as e:  # keep running: log, count, and try the next trigger
                self._count_error(type(e).__name__)
                log.error("camera lookup failed: %s", e)
                continue
            except Exception:  # noqa: BLE001 - a bug in one lookup must not stop the camera loop
                self._count_error("internal")
                log.exception("camera lookup crashed; the loop goes on")
                continue
            self._record(result)
            m = result.match
            top = result.results[0] if result.results else None
            log.info("lookup (%s): %s in %.1f ms (top %s %.3f)", reason,
                     f"match {m.id}" + (f", {m.inliers} inliers" if m.inliers else "") if m else "no match",
                     result.timings_ms["total"], top.id if top else "-", top.score if top else 0.0)

    def _record(self, result: LookupResult) -> None:
        with self._lock:
            self._latest = result
            self._counts[result.source] += 1
            self._outcomes["match" if result.match is not None else "no_match"] += 1
            self._lookup_ms_sum += result.timings_ms.get("total", 0.0)
        for sink in self.sinks:  # events (issue 14): sinks only queue the event, they never block or raise
            sink.publish_lookup(result)

    def _publish_health_due(self) -> None:
        """events (issue 14): hand health() to the sinks every sink_interval_s."""
        now = time.monotonic()
        if self.sinks and now - self._sink_health_at >= self.sink_interval_s:
            self._sink_health_at = now
            health = self.health()
            for sink in self.sinks:
                sink.publish_health(health)

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    # ---- Services (device.web) -----------------------------------------------------------------------
    def query_image(self, data: bytes, source: str) -> LookupResult:
        """Decode + encode + search through the shared Lookup; the result becomes the latest one."""
        try:
            result = self.lookup.lookup_bytes(data, source=source)
        except ApplianceError as e:
            self._count_error(type(e).__name__)
            raise
        self._record(result)
        return result

    def latest_result(self) -> LookupResult | None:
        """The latest lookup (camera or upload)."""
        return self._latest

    def latest_frame_jpeg(self) -> tuple[int, bytes] | None:
        """The newest camera frame as JPEG (encoded once per frame, shared by all viewers)."""
        if self.camera is None:
            return None
        frame = self.camera.latest()
        if frame is None:
            return None
        with self._jpeg_lock:
            if self._jpeg_cache is None or self._jpeg_cache[0] != frame.index:
                self._jpeg_cache = (frame.index, encode_jpeg(frame.rgb, self.stream_quality))
            return self._jpeg_cache

    def wait_frame_jpeg(self, after_index: int, timeout_s: float) -> tuple[int, bytes] | None:
        """Block for a frame newer than ``after_index``; None on timeout."""
        if self.camera is None or self.camera.wait_frame(after_index, timeout_s) is None:
            return None
        return self.latest_frame_jpeg()

    def request_lookup(self) -> None:
        """Look up the next camera frame regardless of motion/stillness."""
        self._requested.set()

    def health(self) -> dict:
        """Camera, bundle, index and uptime; ``ok`` is False while the camera is not streaming."""
        idx = self.holder.index
        cam = self.camera.status() if self.camera is not None else {"state": "absent"}
        enc = self.lookup.encoder.info()
        ok = self.camera is None or cam.get("state") == "streaming"
        out = {"ok": ok, "camera": cam, "bundle": enc,
               "index": {"size": idx.size, "generation": idx.generation, "path": str(self.holder.path),
                         "n_trees": idx.n_trees, "search_k": self.holder.search_k},
               "verification": self.lookup.verification_status(),
               "uptime_s": round(time.time() - self.started, 1)}
        if self.trigger is not None:
            out["trigger"] = {k: (round(v, 2) if isinstance(v, float) else v)
                              for k, v in self.trigger.last_metrics.items()}
        return out

    def metrics(self) -> dict:
        """Counters and gauges for /metrics."""
        with self._lock:
            counts, errors, ms = dict(self._counts), dict(self._errors), self._lookup_ms_sum
            outcomes = {f"outcome={o}": self._outcomes.get(o, 0) for o in ("match", "no_match")}
        cam = self.camera.status() if self.camera is not None else {}
        return {
            "lookups_total": {s: counts.get(s, 0) for s in ("camera", "upload", "cli")},
            "lookup_ms_sum_total": ms,
            "lookup_outcomes_total": outcomes,
            "errors_total": errors or {"none": 0},
            "index_items": self.holder.index.size,
            "camera_frames_total": cam.get("frames_total", 0),
            "camera_reconnects_total": cam.get("reconnects", 0),
            "camera_fps": cam.get("fps") or 0.0,
            "camera_streaming": 1.0 if cam.get("state") == "streaming" else 0.0,
            "uptime_seconds": time.time() - self.started,
            **{k: v for sink in self.sinks for k, v in sink.metrics().items()},  # events (issue 14)
        }

    def enrol(self, data: bytes, label: str, item_id: str | None) -> dict:
        """Decode, keep the original under enrolled_dir (so a rebuild loses nothing), encode and add in
        the background; queries keep using the old index until the new one is swapped in."""
        rgb = decode_image(data, self.lookup.max_pixels)
        item_id = validate_id(item_id or f"enrolled/{uuid.uuid4().hex[:12]}")
        dest = self.enrolled.save(item_id, encode_jpeg(rgb, 95), label)
        item = make_item(self.lookup.encoder, rgb, item_id, label, source=str(dest), enrolment=self.enrolment)
        future = self.holder.add_async([item])
        future.add_done_callback(lambda f: f.exception() and log.error("enrol %s failed: %s", item_id, f.exception()))
        return {"id": item_id, "label": item.label, "status": "queued"}

    def remove(self, item_id: str) -> bool:
        """Remove an item (blocks for the rebuild, a second or so); False if unknown."""
        if not self.holder.index.has(item_id):
            return False
        removed = self.holder.remove([item_id])
        if removed:
            self.enrolled.delete(item_id)
        return bool(removed)

    def thumbnail(self, item_id: str) -> bytes | None:
        """JPEG thumbnail of a catalog item, None if unknown."""
        try:
            return self.holder.index.thumbnail(item_id)
        except CatalogIndexError:
            return None

    def catalog_items(self) -> list[dict]:
        """All items as {"id", "label"}."""
        return [{"id": it.id, "label": it.label} for it in self.holder.index.items]
