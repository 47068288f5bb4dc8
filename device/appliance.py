"""The running appliance: camera → trigger → lookup → latest result, and what the web layer calls (upload a
query, enrol, remove, health, metrics).

It owns no model code: it is handed the camera, the trigger, the shared Lookup and the catalog service (the
store, the live index and the item maker: device/catalog_service.py) by ``device/__main__.py`` (the one place
that wires components)."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Sequence

from .camera import Camera
from .catalog_service import CatalogService
from .config import HistoryConfig, MqttConfig, SseConfig, WebConfig
from .errors import ApplianceError, BusyError, CatalogIndexError, InputError
from .history import History
from .images import decode_image, encode_jpeg
from .lookup import Lookup
from .metrics import Metrics
from .procstat import CpuMeter, rss_mb
from .push import PushHub
from .results import LookupResult
from .trigger import Trigger

if TYPE_CHECKING:
    from .events import EventSink

log = logging.getLogger(__name__)
REMOVE_WAIT_S = 30.0  # a DELETE answers once the index no longer has the item (or after this, committed anyway)


class Appliance:
    """Runs the camera loop in a thread and answers the web layer (device/web/). Thread-safe."""

    def __init__(self, *, lookup: Lookup, catalog: CatalogService, camera: Camera | None, trigger: Trigger | None,
                 max_parallel_uploads: int = WebConfig.model_fields["max_parallel_uploads"].default,
                 sinks: Sequence["EventSink"] = (),
                 sink_interval_s: float = MqttConfig.model_fields["state_interval_s"].default,
                 stream_quality: int = 75, history: History | None = None,
                 summary_interval_s: float = HistoryConfig.model_fields["summary_interval_s"].default,
                 sse: SseConfig | None = None):
        self.lookup = lookup
        self.catalog = catalog
        self.holder = catalog.holder
        self.maker = catalog.maker
        self.camera = camera
        self.trigger = trigger
        self.stream_quality = stream_quality
        self.started = time.time()
        self.metrics = Metrics()
        self._watch_metrics()
        # Each recorded lookup goes to every event sink (MQTT, webhook); health every sink_interval_s.
        self.sinks = tuple(sinks)
        self.sink_interval_s = sink_interval_s
        self._sink_health_at = 0.0
        for sink in self.sinks:
            sink.register_metrics(self.metrics)
        self._latest: LookupResult | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._jpeg_cache: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()
        self._requested = threading.Event()
        # Each upload may hold ~50–100 MB while decoded and encoded: a bounded number at a time.
        self._uploads = threading.BoundedSemaphore(max_parallel_uploads)
        self._max_uploads = max_parallel_uploads
        self._heartbeat_s = time.monotonic()  # the loop stamps it every turn (≤ 0.5 s apart when healthy)
        # What the page's status panel shows: recent lookups, the last error, whether a lookup runs now.
        self.history = history
        self._recent_s: deque[float] = deque()  # monotonic times of the last minute's lookups
        self._last_error: dict | None = None
        self._looking_up_since: float | None = None
        self._cpu = CpuMeter()
        # Each lookup is logged at DEBUG; an INFO line sums them up every summary_interval_s.
        self.summary_interval_s = summary_interval_s
        self._summary = {"lookups": 0, "matches": 0, "errors": 0}
        self._summary_at = time.monotonic()
        self.push = PushHub(sse or SseConfig(), status=self.status)  # what the page is told (GET /api/events)

    def _watch_metrics(self) -> None:
        m = self.metrics

        def camera(key: str, default: float = 0.0):
            return lambda: (self.camera.status().get(key) or default) if self.camera is not None else default

        m.read_at_scrape("appliance_index_items", "Items in the catalog index", "gauge",
                         lambda: self.holder.current().size)
        m.read_at_scrape("appliance_camera_frames", "Frames captured", "counter", camera("frames_total"))
        m.read_at_scrape("appliance_camera_reconnects", "Camera reconnects", "counter", camera("reconnects"))
        m.read_at_scrape("appliance_camera_fps", "Measured camera frames per second", "gauge", camera("fps"))
        m.read_at_scrape("appliance_camera_streaming", "1 while the camera delivers frames", "gauge",
                         lambda: float(self.camera is not None and self.camera.state == "streaming"))
        m.read_at_scrape("appliance_uptime_seconds", "Seconds since start", "gauge",
                         lambda: time.time() - self.started)

    # ---- camera loop -------------------------------------------------------------------------------
    def start(self) -> "Appliance":
        """Bring the index up to date with the catalog store (as every start must) and run its worker, then
        start the camera and the loop that feeds triggered frames to the lookup."""
        self.catalog.start()
        if self.camera is not None:
            self.camera.start()
            self._thread = threading.Thread(target=self._loop, name="lookup-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and the camera (idempotent)."""
        self._stop.set()
        self.push.close()
        if self.camera is not None:
            self.camera.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.catalog.stop()
        if self.history is not None:
            self.history.close()

    def _loop(self) -> None:
        last_index = -1
        while not self._stop.is_set():
            self._heartbeat_s = time.monotonic()
            self._publish_health_due()  # before the frame wait, so a dead camera is reported too
            self._log_summary_due()
            frame = self.camera.wait_frame(last_index, timeout_s=0.5)
            if frame is None:
                if self.camera.state == "stopped":  # wait_frame returns at once then: don't spin
                    self._stop.wait(0.5)
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
            self._looking_up_since = time.time()
            # "requested": the page's button (or MQTT's); "camera": the trigger saw something worth it
            source = "requested" if reason == "requested" else "camera"
            self.push.publish("lookup_started", {"source": source, "timestamp": self._looking_up_since})
            try:
                result = self.lookup.lookup_rgb(frame.rgb, source=source)
            except ApplianceError as e:  # keep running: log, count, and try the next trigger
                self._count_error(type(e).__name__, str(e))
                log.error("camera lookup failed: %s", e)
                continue
            except Exception:  # noqa: BLE001 - a bug in one lookup must not stop the camera loop
                self._count_error("internal", "a camera lookup crashed; see the appliance log")
                log.exception("camera lookup crashed; the loop goes on")
                continue
            finally:
                self._looking_up_since = None
            self._record(result, frame.rgb)
            m = result.match
            top = result.results[0] if result.results else None
            log.debug("lookup (%s): %s in %.1f ms (top %s %.3f)", reason,
                     f"match {m.id}" + (f", {m.inliers} inliers" if m.inliers else "") if m else "no match",
                     result.timings_ms["total"], top.id if top else "-", top.score if top else 0.0)

    def alive(self, max_silence_s: float = 20.0) -> tuple[bool, str]:
        """(ok, why) for the systemd watchdog: the camera loop thread runs and went round within
        ``max_silence_s`` (a lookup takes well under a second), and the camera's watchdog runs (a camera that
        is reconnecting is alive: the watchdog keeps trying)."""
        if self.camera is None:
            return True, "no camera"
        if self._thread is None or not self._thread.is_alive():
            return False, "the camera lookup loop is not running"
        silent_s = time.monotonic() - self._heartbeat_s
        if silent_s > max_silence_s:
            return False, f"the camera lookup loop is stuck (no turn for {silent_s:.0f} s)"
        return self.camera.alive()

    def _record(self, result: LookupResult, rgb=None) -> None:
        """Every lookup passes here: latest result, history (with a snapshot of ``rgb``), metrics, sinks."""
        self._latest = result  # one reference store: atomic
        entry = self.history.record(result, rgb) if self.history is not None else None
        self.push.publish("lookup_finished", entry if entry is not None else result)
        self._recent_s.append(time.monotonic())
        self._summary["lookups"] += 1
        self._summary["matches"] += result.match is not None
        self.metrics.lookups.labels(result.source).inc()
        self.metrics.outcomes.labels("match" if result.match is not None else "no_match").inc()
        self.metrics.lookup_ms.inc(result.timings_ms.get("total", 0.0))
        for sink in self.sinks:  # sinks only queue the event: they never block or raise
            sink.publish_lookup(result)

    def _publish_health_due(self) -> None:
        now = time.monotonic()
        if self.sinks and now - self._sink_health_at >= self.sink_interval_s:
            self._sink_health_at = now
            health = self.health()
            for sink in self.sinks:
                sink.publish_health(health)

    def _count_error(self, kind: str, message: str | None = None) -> None:
        self.metrics.errors.labels(kind).inc()
        self._summary["errors"] += 1
        self._last_error = {"kind": kind, "message": message or kind, "timestamp": time.time()}

    def _log_summary_due(self) -> None:
        now = time.monotonic()
        if now - self._summary_at >= self.summary_interval_s:
            s, self._summary = self._summary, {"lookups": 0, "matches": 0, "errors": 0}
            log.info("last %.0f s: %d lookups, %d matches, %d errors", now - self._summary_at, s["lookups"],
                     s["matches"], s["errors"])
            self._summary_at = now

    # ---- what the web layer calls ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _upload_slot(self):
        """One of ``max_parallel_uploads`` slots, or BusyError at once (the web layer: 503 + Retry-After)."""
        if not self._uploads.acquire(blocking=False):
            self._count_error("BusyError")
            raise BusyError(f"{self._max_uploads} uploads are being processed (web.max_parallel_uploads); "
                            "try again in a second")
        try:
            yield
        finally:
            self._uploads.release()

    def query_image(self, data: bytes, source: str) -> LookupResult:
        """Decode + encode + search through the shared Lookup; the result becomes the latest one, and the
        decoded photo its history snapshot."""
        with self._upload_slot():
            self.push.publish("lookup_started", {"source": source, "timestamp": time.time()})
            try:
                rgb, decode_ms = self.lookup.decode(data)
                result = self.lookup.lookup_rgb(rgb, source=source, timings={"decode": decode_ms})
            except ApplianceError as e:
                self._count_error(type(e).__name__, str(e))
                raise
            self._record(result, rgb)
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
        idx = self.holder.current()
        cam = self.camera.status() if self.camera is not None else {"state": "absent"}
        enc = self.lookup.encoder.info()
        ok = self.camera is None or cam.get("state") == "streaming"
        out = {"ok": ok, "camera": cam, "bundle": enc,
               "index": {"size": idx.size, "generation": idx.generation, "path": str(self.holder.path),
                         "n_trees": idx.n_trees, "search_k": self.holder.config.search_k},
               "verification": self.lookup.verification_status(),
               "adaptation": idx.projection.describe() if idx.projection is not None else
               {"enabled": False, "why": "recognition.adapt is false" if not self.maker.recognition.adapt else
                "the index was built without a catalog-adapted projection (rebuild it with `index build`)"},
               "uptime_s": round(time.time() - self.started, 1)}
        if self.trigger is not None:
            out["trigger"] = {k: (round(v, 2) if isinstance(v, float) else v)
                              for k, v in self.trigger.last_metrics.items()}
        out["enrolled"] = self.catalog.health()
        return out

    def status(self) -> dict:
        """What the page's status panel polls (small, cheap): camera state/fps, trigger, lookups in the last
        minute, whether a lookup runs now, the last error, CPU and RSS of this process, index size and
        generation, verification, and the latest lookup's time and history number."""
        now = time.monotonic()
        with contextlib.suppress(IndexError):  # another thread (a request, the push hub) may pop it first
            while self._recent_s and now - self._recent_s[0] > 60.0:
                self._recent_s.popleft()
        cam = self.camera.status() if self.camera is not None else {"state": "absent"}
        idx, latest = self.holder.current(), self._latest
        entries = self.history.entries()[:1] if self.history is not None else []
        return {
            "camera": {k: cam.get(k) for k in ("state", "spec", "fps", "last_frame_age_s", "last_error")},
            "trigger": {"enabled": self.trigger is not None,
                        **(self.trigger.last_metrics if self.trigger is not None else {})},
            "looking_up": self._looking_up_since is not None or self._requested.is_set(),
            "lookups_per_min": len(self._recent_s),
            "last_error": self._last_error or ({"kind": "catalog", "message": self.catalog.last_error}
                                               if self.catalog.last_error else None),
            "process": {"cpu_percent": self._cpu.percent(), "rss_mb": rss_mb()},
            "index": {"size": idx.size, "generation": idx.generation},
            "verification": self.lookup.verification_status(),
            "latest": {"timestamp": latest.timestamp if latest else None,
                       "n": entries[0].n if entries else None},
            "uptime_s": round(time.time() - self.started, 1),
        }

    def enrol(self, data: bytes, label: str, item_id: str | None) -> dict:
        """Validate everything first (id, label, decode, encoding and features), then commit the original to the
        catalog store, then index in the background; queries keep using the old index until the new one is
        swapped in. A crash after this returns loses nothing (the next start replays the store). Raises
        InputError (400/413/415) before anything is written, BusyError (503), DiskFullError (507)."""
        return self._enrol(
            lambda: decode_image(data, self.lookup.max_pixels, min_side_px=self.lookup.decode_side_px()),
            label, item_id)

    def enrol_frame(self, label: str, item_id: str | None) -> dict:
        """Enrol what the camera sees now (its latest frame), like :meth:`enrol`; InputError (409) without a
        camera frame."""
        frame = self.camera.latest() if self.camera is not None else None
        if frame is None:
            raise InputError("no camera frame to enrol (is the camera streaming?)", http_status=409)
        return self._enrol(lambda: frame.rgb, label, item_id)

    def _enrol(self, get_rgb, label: str, item_id: str | None) -> dict:
        item_id, label = self.catalog.validate(item_id, label)
        with self._upload_slot():
            return self.catalog.enrol(get_rgb(), item_id, label)

    def remove(self, item_id: str) -> bool:
        """Remove an item: the removal is committed to the catalog store first (so it survives a crash and a
        rebuild from the catalog folder), then this waits (up to REMOVE_WAIT_S) for the index without it.
        False if unknown."""
        seq = self.catalog.remove(item_id)
        if seq is None:
            return False
        self.catalog.wait_applied(seq, REMOVE_WAIT_S)
        return True

    def thumbnail(self, item_id: str) -> bytes | None:
        """JPEG thumbnail of a catalog item, None if unknown."""
        try:
            return self.holder.current().thumbnail(item_id)
        except CatalogIndexError:
            return None

    def catalog_items(self) -> list[dict]:
        """All items as {"id", "label"}."""
        return [{"id": it.id, "label": it.label} for it in self.holder.current().items]
