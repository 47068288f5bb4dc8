"""The capture thread and its watchdog: a frame source (edge_retrieval/capture/sources.py) read in a background thread,
the latest frame kept for every consumer, and the source reopened with backoff when it fails, ends or stalls.
Frames are RGB ``uint8`` HxWx3 (the sources' contract).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edge_retrieval.capture.sources import FrameSource, open_source, redact
from edge_retrieval.core.config import CameraConfig, ImagesConfig
from edge_retrieval.core.errors import CameraError
from edge_retrieval.core.status import CameraStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Frame:
    """One captured frame: ``rgb`` (read-only RGB uint8 HxWx3), ``index`` (1, 2, ... over the
    camera's life, across reconnects) and ``timestamp`` (``time.monotonic()`` at capture)."""

    rgb: np.ndarray
    index: int
    timestamp: float


class _Reader:
    """One attempt at streaming: a thread that opens the source and reads until told to stop.

    ``cv2.VideoCapture.read()`` cannot be interrupted, so a stalled reader is abandoned, never joined.
    """

    def __init__(self) -> None:
        self.abandoned = threading.Event()
        self.done = False
        self.error: str | None = None
        self.opened = False
        self.frames = 0
        self.progress_s = time.monotonic()
        self.thread: threading.Thread | None = None


CameraState = Literal["starting", "streaming", "reconnecting", "stopped"]

_FPS_WINDOW_S = 5.0


class Camera:
    """Runs a frame source in a background thread and keeps only the latest frame.

    A watchdog reopens the source, with exponential backoff between ``backoff_initial_s`` and
    ``backoff_max_s``, when opening fails, when the source ends (``read()`` returns None) or when no
    frame arrives for ``stall_timeout_s``. It never gives up: the appliance keeps running and the
    state stays "reconnecting" until the camera is back. ``opener`` is called as
    ``opener(spec, fps=, loop=, width=, height=, max_pixels=, hold_s=)`` and returns a ``FrameSource``; ``images`` bounds
    what an image-folder source decodes.
    """

    def __init__(self, config: CameraConfig, images: ImagesConfig = ImagesConfig(), *,
                 opener: Callable[..., FrameSource] = open_source):
        self.config = config
        self.images = images
        self.spec = config.source
        self._name = redact(config.source)
        self._opener = opener
        # A deliberately slow source (a folder at 0.1 fps) is not a stalled one.
        self._stall_timeout_s = (max(config.stall_timeout_s, 2.0 / config.fps) if config.fps
                                 else config.stall_timeout_s)

        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._state: CameraState = "stopped"
        self._latest: Frame | None = None
        self._frames_total = 0
        self._frame_times_s: collections.deque[float] = collections.deque(maxlen=2000)
        self._reconnects = 0
        self._last_error: str | None = None
        self._supervisor: threading.Thread | None = None
        self._reader: _Reader | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Camera:
        """Start capturing in the background (returns at once). Calling it while running is a no-op."""
        with self._cond:
            if self._supervisor is not None and self._supervisor.is_alive():
                return self
            self._stop.clear()
            self._set_state("starting")
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"camera-watchdog {self._name}", daemon=True
            )
            self._supervisor.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop capturing and join the watchdog. Idempotent; returns promptly even if a read is stuck
        (that reader thread is abandoned; it is a daemon and exits if its read ever returns)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            supervisor, reader = self._supervisor, self._reader
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout_s)
        if reader is not None and reader.thread is not None:
            reader.thread.join(min(timeout_s, 0.5))
            if reader.thread.is_alive():
                log.warning("camera %s: reader thread still blocked in read(); abandoned", self._name)
        with self._cond:
            self._supervisor = None
            self._reader = None
            self._set_state("stopped")
            self._cond.notify_all()

    def __enter__(self) -> Camera:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- consumers ---------------------------------------------------------------------------------

    @property
    def state(self) -> CameraState:
        """"starting", "streaming", "reconnecting" or "stopped"."""
        with self._cond:
            return self._state

    def alive(self) -> tuple[bool, str]:
        """(ok, why): whether the watchdog thread runs. It never gives up, so "reconnecting" is alive; a
        dead watchdog means frames never come back."""
        supervisor = self._supervisor
        if supervisor is None or not supervisor.is_alive():
            return False, f"camera {self._name}: the capture watchdog is not running ({self.state})"
        return True, f"camera {self.state}"

    def latest(self) -> Frame | None:
        """The newest frame, or None if none has arrived yet."""
        with self._cond:
            return self._latest

    def wait_frame(self, after_index: int, timeout_s: float) -> Frame | None:
        """Wait until a frame with ``index > after_index`` exists and return the newest one; None on
        timeout or when the camera is stopped. Pass ``after_index=0`` for any frame."""
        with self._cond:
            self._cond.wait_for(
                lambda: (self._latest is not None and self._latest.index > after_index)
                or self._stop.is_set(),
                timeout_s,
            )
            latest = self._latest
            return latest if latest is not None and latest.index > after_index else None

    def status(self) -> CameraStatus:
        """Health summary: state, spec, frames_total, fps (measured over the last seconds),
        last_frame_age_s (None before the first frame), reconnects, last_error."""
        now_s = time.monotonic()
        with self._cond:
            recent = [t for t in self._frame_times_s if now_s - t <= _FPS_WINDOW_S]
            span_s = recent[-1] - recent[0] if len(recent) >= 2 else 0.0
            fps = (len(recent) - 1) / span_s if span_s > 0 else 0.0
            latest = self._latest
            return CameraStatus(
                state=self._state, spec=self._name, frames_total=self._frames_total, fps=round(fps, 2),
                last_frame_age_s=None if latest is None else round(now_s - latest.timestamp, 3),
                reconnects=self._reconnects, last_error=self._last_error)

    # -- internals ---------------------------------------------------------------------------------

    def _set_state(self, state: CameraState, why: str | None = None) -> None:
        # caller holds self._cond
        if state == self._state:
            return
        self._state = state
        if why:
            log.warning("camera %s: %s (%s)", self._name, state, why)
        else:
            log.info("camera %s: %s", self._name, state)

    def _supervise(self) -> None:
        backoff_s = self.config.backoff_initial_s
        first = True
        while not self._stop.is_set():
            if not first:
                with self._cond:
                    self._reconnects += 1
            first = False
            reader = _Reader()
            reader.thread = threading.Thread(
                target=self._read_loop, args=(reader,), name=f"camera-reader {self._name}", daemon=True
            )
            with self._cond:
                self._reader = reader
            reader.thread.start()

            why = self._watch(reader)
            if why is None:  # stopping
                reader.abandoned.set()
                return
            reader.abandoned.set()
            if reader.frames:
                backoff_s = self.config.backoff_initial_s  # it worked for a while: retry quickly
            with self._cond:
                self._last_error = why
                self._set_state("reconnecting", f"{why}; retrying in {backoff_s:.1f} s")
            if self._stop.wait(backoff_s):
                return
            backoff_s = min(backoff_s * 2 if backoff_s else self.config.backoff_initial_s, self.config.backoff_max_s)

    def _watch(self, reader: _Reader) -> str | None:
        """Wait until the reader fails, ends or stalls; return why, or None when asked to stop."""
        with self._cond:
            while True:
                if self._stop.is_set():
                    return None
                if reader.done:
                    return reader.error or f"{self._name}: source ended"
                idle_s = time.monotonic() - reader.progress_s
                if idle_s >= self._stall_timeout_s:
                    if not reader.opened:
                        return f"{self._name}: opening did not finish within {idle_s:.1f} s"
                    return (f"{self._name}: no frame for {idle_s:.1f} s "
                            f"(stall timeout {self._stall_timeout_s:.1f} s)")
                self._cond.wait(min(self._stall_timeout_s - idle_s, 0.5) + 0.01)

    def _read_loop(self, reader: _Reader) -> None:
        source: FrameSource | None = None
        try:
            cfg = self.config
            source = self._opener(self.spec, fps=cfg.fps, loop=cfg.loop, width=cfg.width, height=cfg.height,
                                  max_pixels=self.images.max_pixels, hold_s=cfg.hold_s)
            reader.opened = True  # a stall from now on is a stalled stream, not a slow open
            reader.progress_s = time.monotonic()
            while not reader.abandoned.is_set():
                rgb = source.read()
                if rgb is None:
                    reader.error = f"{self._name}: source returned no frame (ended or disconnected)"
                    break
                self._publish(reader, rgb)
        except CameraError as exc:
            reader.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken driver must not kill the watchdog's reader silently
            reader.error = f"{self._name}: {type(exc).__name__}: {exc}"
        finally:
            if source is not None:
                # Only this thread may release the source: releasing a VideoCapture while another
                # thread is inside read() can crash the process.
                try:
                    source.close()
                except Exception as exc:  # noqa: BLE001 - closing a broken source must not stop the reader
                    log.warning("camera %s: error while closing source: %s", self._name, exc)
            with self._cond:
                reader.done = True
                self._cond.notify_all()

    def _publish(self, reader: _Reader, rgb: np.ndarray) -> None:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise CameraError(
                f"{self._name}: source gave a {rgb.dtype} {rgb.shape} frame, not RGB uint8 HxWx3"
            )
        view = np.ascontiguousarray(rgb).view()
        view.setflags(write=False)  # one frame is shared by every consumer
        now_s = time.monotonic()
        with self._cond:
            if reader.abandoned.is_set():
                return  # a late frame from a reader the watchdog already gave up on
            self._frames_total += 1
            self._latest = Frame(view, self._frames_total, now_s)
            self._frame_times_s.append(now_s)
            reader.frames += 1
            reader.progress_s = now_s
            self._set_state("streaming")
            self._cond.notify_all()
