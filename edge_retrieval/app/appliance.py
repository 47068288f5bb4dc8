"""The running appliance: the one object the web layer (edge_retrieval/web/) and the systemd watchdog talk to, made of
parts with one job each, all built by ``edge_retrieval.app.wiring.build_appliance``:

- the camera loop (edge_retrieval/app/camera_loop.py): camera → trigger → lookup → recorder, and the live view's JPEG;
- the recorder (edge_retrieval/outputs/recorder.py): latest result, history, metrics, MQTT/webhook sinks, the page's events;
- the catalog service (edge_retrieval/catalog/service.py): the store, the live index, enrolment and removal;
- the shared Lookup (edge_retrieval/search/lookup.py), which an upload goes through as the camera does.

Here: uploads under a bounded number of slots, and the typed health and status documents (edge_retrieval/core/status.py)."""
from __future__ import annotations

import contextlib
import threading
import time
from urllib.parse import quote

import numpy as np

from edge_retrieval.app.camera_loop import CameraLoop
from edge_retrieval.catalog.service import CatalogService
from edge_retrieval.core.config import WebConfig
from edge_retrieval.core.errors import BusyError, CatalogIndexError, InputError
from edge_retrieval.core.photos import item_of, photo_key
from edge_retrieval.core.procstat import CpuMeter, rss_mb
from edge_retrieval.core.results import LookupResult
from edge_retrieval.core.status import (
    ABSENT_CAMERA,
    CameraStatus,
    ErrorInfo,
    Health,
    IndexSummary,
    LatestLookup,
    ProcessStatus,
    Status,
    TriggerStatus,
)
from edge_retrieval.outputs.recorder import Recorder
from edge_retrieval.search.lookup import Lookup

REMOVE_WAIT_S = 30.0  # a DELETE answers once the index no longer has the item (or after this, committed anyway)
TICK_S = 0.5  # without a camera loop, how often the recorder's schedule is looked at


class Appliance:
    """The parts of a running appliance behind the methods the web layer calls (``edge_retrieval.web.Services``)."""

    def __init__(self, *, lookup: Lookup, catalog: CatalogService, recorder: Recorder,
                 camera_loop: CameraLoop | None, web: WebConfig):
        """``web.max_parallel_uploads``: uploads decoded and looked up at once (each may hold ~50–100 MB)."""
        self.lookup = lookup
        self.catalog = catalog
        self.recorder = recorder
        self.camera_loop = camera_loop
        self.metrics = recorder.metrics
        self.history = recorder.history
        self.push = recorder.push
        self.started = time.time()
        self._uploads = threading.BoundedSemaphore(web.max_parallel_uploads)
        self._max_uploads = web.max_parallel_uploads
        self._cpu = CpuMeter()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.push.watch(self.status)  # what the page is told (GET /api/events)
        self._watch_metrics()

    def _watch_metrics(self) -> None:
        m, loop = self.metrics, self.camera_loop

        def camera(key: str):
            return lambda: float(getattr(loop.camera.status(), key) or 0.0) if loop is not None else 0.0

        m.read_at_scrape("appliance_index_items", "Items in the catalog index", "gauge",
                         lambda: self.catalog.holder.current().item_count)
        m.read_at_scrape("appliance_camera_frames", "Frames captured", "counter", camera("frames_total"))
        m.read_at_scrape("appliance_camera_reconnects", "Camera reconnects", "counter", camera("reconnects"))
        m.read_at_scrape("appliance_camera_fps", "Measured camera frames per second", "gauge", camera("fps"))
        m.read_at_scrape("appliance_camera_streaming", "1 while the camera delivers frames", "gauge",
                         lambda: float(loop is not None and loop.camera.state == "streaming"))
        m.read_at_scrape("appliance_uptime_seconds", "Seconds since start", "gauge",
                         lambda: time.time() - self.started)

    # ---- running ---------------------------------------------------------------------------------------
    def start(self) -> Appliance:
        """Bring the index up to date with the catalog store (as every start must) and run its worker, then
        start the camera loop; it runs the recorder's schedule (health to MQTT, the summary line), which an
        appliance without a camera runs in a thread of its own."""
        self.catalog.start()
        if self.camera_loop is not None:
            self.camera_loop.start(on_turn=self._tick)
        else:
            self._ticker = threading.Thread(target=self._tick_until_stopped, name="recorder-tick", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        self.recorder.tick(self.health, changed=self._health_key)

    def _health_key(self) -> tuple:
        """What, when it changes, goes to MQTT at once: the camera's state and the index generation (cheap)."""
        loop = self.camera_loop
        return (loop.camera.state if loop is not None else "absent", self.catalog.holder.current().generation)

    def _tick_until_stopped(self) -> None:
        while not self._stop.wait(TICK_S):
            self._tick()

    def stop(self) -> None:
        """Stop the camera loop, the page's streams, the catalog worker and the history (idempotent)."""
        self._stop.set()
        self.push.close()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self.camera_loop is not None:
            self.camera_loop.stop()
        self.catalog.stop()
        self.recorder.close()

    def alive(self) -> tuple[bool, str]:
        """(ok, why) for the systemd watchdog (edge_retrieval/app/systemd.py): the camera loop and the camera's watchdog run."""
        return self.camera_loop.alive() if self.camera_loop is not None else (True, "no camera")

    # ---- what the web layer calls ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _upload_slot(self):
        """One of ``web.max_parallel_uploads`` slots, or BusyError at once (the web layer: 503 + Retry-After)."""
        if not self._uploads.acquire(blocking=False):
            self.recorder.count_error("BusyError", device=False)  # a visitor's request, answered 503
            raise BusyError(f"{self._max_uploads} uploads are being processed (web.max_parallel_uploads); "
                            "try again in a second")
        try:
            yield
        finally:
            self._uploads.release()

    def query_image(self, data: bytes, source: str) -> LookupResult:
        """Decode + encode + search through the shared Lookup; the result becomes the latest one, and the
        decoded photo its history snapshot."""
        def look_up() -> tuple[LookupResult, np.ndarray]:
            rgb, decode_ms = self.lookup.decode(data)
            return self.lookup.lookup_rgb(rgb, source=source, timings={"decode": decode_ms}), rgb

        with self._upload_slot():
            return self.recorder.run(source, look_up)

    def latest_result(self) -> LookupResult | None:
        """The latest lookup (camera or upload)."""
        return self.recorder.latest

    def latest_frame_jpeg(self) -> tuple[int, bytes] | None:
        """The newest camera frame as (index, JPEG), None without a camera or a frame."""
        return self.camera_loop.latest_frame_jpeg() if self.camera_loop is not None else None

    def wait_frame_jpeg(self, after_index: int, timeout_s: float) -> tuple[int, bytes] | None:
        """Block for a frame newer than ``after_index``; None on timeout or without a camera."""
        return self.camera_loop.wait_frame_jpeg(after_index, timeout_s) if self.camera_loop is not None else None

    def request_lookup(self) -> None:
        """Look up the next camera frame regardless of motion/stillness (the page's button, MQTT's)."""
        if self.camera_loop is not None:
            self.camera_loop.request_lookup()

    def _camera(self) -> CameraStatus:
        return self.camera_loop.camera.status() if self.camera_loop is not None else ABSENT_CAMERA

    def _trigger(self) -> TriggerStatus:
        return self.camera_loop.trigger_status() if self.camera_loop is not None else TriggerStatus(enabled=False)

    def health(self) -> Health:
        """Camera, bundle, index, verification, adaptation, catalog store, uptime; ``ok`` is False while the
        camera is not streaming."""
        cam, trigger = self._camera(), self._trigger()
        return Health(
            ok=self.camera_loop is None or cam.state == "streaming", camera=cam, bundle=self.lookup.encoder.info(),
            index=self.catalog.index_health(), verification=self.lookup.verification_status(),
            adaptation=self.catalog.adaptation(), uptime_s=round(time.time() - self.started, 1),
            trigger=trigger if trigger.enabled else None, enrolled=self.catalog.health())

    def status(self) -> Status:
        """What the page's status panel shows (small, cheap): camera, trigger, lookups in the last minute,
        whether a lookup runs now, the last error, CPU and RSS of this process, index size and generation,
        verification, and the latest lookup's time and history number."""
        idx, latest = self.catalog.holder.current(), self.recorder.latest
        entries = self.history.entries()[:1] if self.history is not None else []
        error = self.recorder.last_error or (ErrorInfo(kind="catalog", message=self.catalog.last_error)
                                             if self.catalog.last_error else None)
        return Status(
            camera=self._camera(), trigger=self._trigger(),
            looking_up=self.camera_loop is not None and self.camera_loop.looking_up,
            lookups_per_min=self.recorder.lookups_per_min(), last_error=error,
            process=ProcessStatus(cpu_percent=self._cpu.percent(), rss_mb=rss_mb()),
            index=IndexSummary(size=idx.item_count, generation=idx.generation + (f"+{idx.changes}" if idx.changes else "")),
            verification=self.lookup.verification_status(),
            latest=LatestLookup(timestamp=latest.timestamp if latest else None, n=entries[0].n if entries else None),
            uptime_s=round(time.time() - self.started, 1))

    def enrol(self, data: bytes, label: str, item_id: str | None, *, attributes: dict | None = None,
              replace: bool = False) -> dict:
        """Validate everything first (id, label, decode, encoding and features), then commit the original to the
        catalog store, then index in the background; queries keep using the old index until the new one is
        swapped in. A crash after this returns loses nothing (the next start replays the store). Raises
        InputError (400/413/415, 409 for an id in use unless ``replace``) before anything is written, BusyError
        (503), DiskFullError (507)."""
        return self._enrol(lambda: self.lookup.decode(data)[0], label, item_id, attributes, replace)

    def enrol_frame(self, label: str, item_id: str | None, *, attributes: dict | None = None,
                    replace: bool = False) -> dict:
        """Enrol what the camera sees now (its latest frame), like :meth:`enrol`; InputError (409) without a
        camera frame."""
        return self._enrol(self._frame_rgb, label, item_id, attributes, replace)

    def _frame_rgb(self):
        frame = self.camera_loop.camera.latest() if self.camera_loop is not None else None
        if frame is None:
            raise InputError("no camera frame to enrol (is the camera streaming?)", http_status=409)
        return frame.rgb

    def _enrol(self, get_rgb, label: str, item_id: str | None, attributes: dict | None, replace: bool) -> dict:
        item_id, label = self.catalog.validate(item_id, label)
        with self._upload_slot():
            return self.catalog.enrol(get_rgb(), item_id, label, attributes=attributes, replace=replace)

    def add_photo(self, item_id: str, data: bytes | None, photo: str | None = None) -> dict:
        """One more photo of an item: the uploaded image, or (``data`` None) what the camera sees now. InputError
        as for an enrolment, 404 for an unknown item, 409 for a photo name in use or an item at its limit."""
        get_rgb = self._frame_rgb if data is None else (lambda: self.lookup.decode(data)[0])
        with self._upload_slot():
            return self.catalog.add_photo(get_rgb(), item_id, photo)

    def remove_photo(self, item_id: str, photo: str) -> dict:
        """Remove one photo of an item (committed, then applied like a removal); InputError 404 / 409."""
        seq = self.catalog.remove_photo(item_id, photo)
        self.catalog.wait_applied(seq, REMOVE_WAIT_S)
        return {"id": item_id, "photo": photo, "status": "removed"}

    def item_details(self, item_id: str) -> dict:
        """An item as the page shows it: id, label, attributes and its photos (name, thumbnail URL); InputError
        404 when it is not in the catalog."""
        label, attributes, photos = self.catalog.describe(item_id)
        return {"id": item_id, "label": label, "attributes": attributes,
                "photos": [{"photo": p, "thumbnail": _thumb_url(item_id, p)} for p in photos]}

    def remove(self, item_id: str) -> bool:
        """Remove an item: the removal is committed to the catalog store first (so it survives a crash and a
        rebuild from the catalog folder), then this waits (up to REMOVE_WAIT_S) for the index without it.
        False if unknown."""
        seq = self.catalog.remove(item_id)
        if seq is None:
            return False
        self.catalog.wait_applied(seq, REMOVE_WAIT_S)
        return True

    def thumbnail(self, item_id: str, photo: str = "") -> bytes | None:
        """JPEG thumbnail of a catalog item (its first photo, or the one named ``photo``), None if unknown."""
        try:
            return self.catalog.holder.current().thumbnail(photo_key(item_id, photo))
        except CatalogIndexError:
            return None

    def catalog_items(self) -> list[dict]:
        """All items as {"id", "label", "attributes", "photos"} (an item of several photos is one item)."""
        items: dict[str, dict] = {}
        for it in self.catalog.holder.current().items:
            item_id = item_of(it.id)
            if item_id in items:
                items[item_id]["photos"] += 1
            else:
                items[item_id] = {"id": item_id, "label": it.label, "attributes": it.attributes, "photos": 1}
        return list(items.values())


def _thumb_url(item_id: str, photo: str) -> str:
    return f"/api/catalog/{quote(item_id)}/thumb.jpg" + (f"?photo={quote(photo)}" if photo else "")
