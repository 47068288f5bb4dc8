"""The camera loop: camera → trigger → lookup → recorder, in one thread; and the live view's JPEG of the newest
frame (encoded once per frame, shared by every viewer)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_retrieval.capture.camera import Camera, Frame
from edge_retrieval.capture.trigger import Trigger
from edge_retrieval.core.config import WebConfig
from edge_retrieval.core.errors import ApplianceError
from edge_retrieval.core.status import TriggerStatus
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.outputs.recorder import Recorder
from edge_retrieval.search.lookup import Lookup

log = logging.getLogger(__name__)


class CameraLoop:
    """Feeds triggered frames (and frames asked for with :meth:`request_lookup`) to the shared Lookup."""

    def __init__(self, camera: Camera, trigger: Trigger | None, lookup: Lookup, recorder: Recorder, *,
                 web: WebConfig):
        """``web.stream_quality``: the live view's JPEG quality."""
        self.camera = camera
        self.trigger = trigger
        self.lookup = lookup
        self.recorder = recorder
        self.stream_quality = web.stream_quality
        self._on_turn: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._requested = threading.Event()
        self._heartbeat_s = time.monotonic()  # the loop stamps it every turn (≤ 0.5 s apart when healthy)
        self._looking_up_since: float | None = None
        self._jpeg_cache: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()

    def start(self, on_turn: Callable[[], None] | None = None) -> CameraLoop:
        """Start the camera and the loop; ``on_turn()`` runs every turn (≤ 0.5 s apart), before the frame wait,
        so what it reports goes out with a dead camera too (the recorder's schedule: edge_retrieval/outputs/recorder.py)."""
        self._on_turn = on_turn or self._on_turn
        self.camera.start()
        self._thread = threading.Thread(target=self._loop, name="lookup-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and the camera (idempotent)."""
        self._stop.set()
        self.camera.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def request_lookup(self) -> None:
        """Look up the next camera frame regardless of motion/stillness."""
        self._requested.set()

    @property
    def looking_up(self) -> bool:
        """A lookup runs now, or one was asked for."""
        return self._looking_up_since is not None or self._requested.is_set()

    def trigger_status(self) -> TriggerStatus:
        """Whether the trigger runs, and its last measurements."""
        if self.trigger is None:
            return TriggerStatus(enabled=False)
        return TriggerStatus(enabled=True, **self.trigger.last_metrics)

    def _reason(self, frame: Frame) -> str | None:
        """Why this frame is looked up ("requested", "moved", "still"), or None."""
        requested = self._requested.is_set()
        self._requested.clear()
        if self.trigger is None:
            return "requested" if requested else None
        if requested:
            self.trigger.request()
        return self.trigger.update(frame.rgb, frame.timestamp)

    def _loop(self) -> None:
        last_index = -1
        while not self._stop.is_set():
            self._heartbeat_s = time.monotonic()
            self._on_turn()
            frame = self.camera.wait_frame(last_index, timeout_s=0.5)
            if frame is None:
                if self.camera.state == "stopped":  # wait_frame returns at once then: don't spin
                    self._stop.wait(0.5)
                continue
            last_index = frame.index
            reason = self._reason(frame)
            if reason is not None:
                self._look_up(frame, reason)

    def _look_up(self, frame: Frame, reason: str) -> None:
        self._looking_up_since = time.time()
        # "requested": the page's button (or MQTT's); "camera": the trigger saw something worth it
        source = "requested" if reason == "requested" else "camera"
        try:
            result = self.recorder.run(source, lambda: (self.lookup.lookup_rgb(frame.rgb, source=source), frame.rgb),
                                       started_at=self._looking_up_since)
        except ApplianceError as e:  # counted by the recorder; keep running and try the next trigger
            log.error("camera lookup failed: %s", e)
            return
        except Exception:  # a bug in one lookup must not stop the camera loop: counted, logged, the loop goes on
            self.recorder.count_error("internal", "a camera lookup crashed; see the appliance log")
            log.exception("camera lookup crashed; the loop goes on")
            return
        finally:
            self._looking_up_since = None
        m = result.match
        top = result.results[0] if result.results else None
        log.debug("lookup (%s): %s in %.1f ms (top %s %.3f)", reason,
                  f"match {m.id}" + (f", {m.inliers} inliers" if m.inliers else "") if m else "no match",
                  result.timings_ms["total"], top.id if top else "-", top.score if top else 0.0)

    def alive(self, max_silence_s: float = 20.0) -> tuple[bool, str]:
        """(ok, why) for the systemd watchdog: the loop thread runs and went round within ``max_silence_s`` (a
        lookup takes well under a second), and the camera's watchdog runs (a camera that is reconnecting is
        alive: the watchdog keeps trying)."""
        if self._thread is None or not self._thread.is_alive():
            return False, "the camera lookup loop is not running"
        silent_s = time.monotonic() - self._heartbeat_s
        if silent_s > max_silence_s:
            return False, f"the camera lookup loop is stuck (no turn for {silent_s:.0f} s)"
        return self.camera.alive()

    def latest_frame_jpeg(self) -> tuple[int, bytes] | None:
        """The newest camera frame as (index, JPEG), None before the first."""
        frame = self.camera.latest()
        if frame is None:
            return None
        with self._jpeg_lock:
            if self._jpeg_cache is None or self._jpeg_cache[0] != frame.index:
                self._jpeg_cache = (frame.index, encode_jpeg(frame.rgb, self.stream_quality))
            return self._jpeg_cache

    def wait_frame_jpeg(self, after_index: int, timeout_s: float) -> tuple[int, bytes] | None:
        """Block for a frame newer than ``after_index``; None on timeout."""
        if self.camera.wait_frame(after_index, timeout_s) is None:
            return None
        return self.latest_frame_jpeg()
