"""Frame sources, the capture thread and its watchdog.

This is the ONLY module of the project where BGR→RGB conversion happens: everything handed out here
(decoded uploads, catalog files, camera frames) is RGB ``uint8`` HxWx3 and C-contiguous, so the rest of
the device never has to think about colour order.
"""
from __future__ import annotations

import collections
import functools
import io
import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Literal

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from device.errors import CameraError, ImageError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000

# A truncated upload must fail loudly rather than come back as a half-grey picture that then gets
# "matched"; something else in the process could have flipped this global, so pin it.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own (smaller, configurable) pixel limit before decoding; Pillow's warning is noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

# Images a folder source considers (by extension); anything else in the folder is ignored silently.
_IMAGE_SUFFIXES = frozenset(ext.lower() for ext in Image.registered_extensions())

_DEFAULT_FOLDER_FPS = 2.0
_DEFAULT_CSI_SIZE_PX = (1280, 720)
_DEFAULT_CSI_FPS = 30
_NETWORK_TIMEOUT_MS = 5000


# ----------------------------------------------------------------------------------------------------
# Still images
# ----------------------------------------------------------------------------------------------------

def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, min_side_px: int | None = None) -> np.ndarray:
    """Decode image bytes (an upload, a stored file) into RGB uint8 HxWx3.

    The pixel count is checked from the header before any pixel is decoded, EXIF orientation is
    applied, and every mode (L, LA, P, RGBA, CMYK, 16-bit) ends up as RGB (alpha is composited onto
    white). ``min_side_px``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (in the DCT domain, much
    cheaper) as long as both sides stay ≥ this — for callers that downscale anyway.
    Raises ``ImageError`` for empty, non-image, truncated/corrupt or too-large input.
    """
    if not data:
        raise ImageError("not an image (or unsupported format): no data")
    return _decode(io.BytesIO(data), max_pixels, min_side_px)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file into RGB uint8 HxWx3 (see ``decode_image``).

    Raises ``ImageError`` naming the file when it is missing, unreadable, not an image or too large.
    """
    try:
        with open(path, "rb") as fp:
            return _decode(fp, max_pixels)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file: {exc.strerror or exc}") from exc


def _decode(fp: BinaryIO, max_pixels: int, min_side_px: int | None = None) -> np.ndarray:
    try:
        img = Image.open(fp)
    except UnidentifiedImageError as exc:
        raise ImageError("not an image (or unsupported format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large ({exc}); the limit is {max_pixels / 1e6:.1f} MP") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"not an image (or unsupported format): {exc}") from exc
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height / 1e6:.1f} MP, "
                f"over the limit of {max_pixels / 1e6:.1f} MP"
            )
        try:
            if min_side_px and img.format == "JPEG":
                img.draft(img.mode, (min_side_px, min_side_px))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb_array(img)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image is too large ({exc})") from exc
        except MemoryError as exc:
            raise ImageError(f"image is {width}x{height}: not enough memory to decode it") from exc
        except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, ... on bad data
            raise ImageError(f"truncated or corrupt image: {exc}") from exc


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        # Pillow's own conversion clips 16-bit values at 255 (a white picture); scale instead.
        values = np.asarray(img, dtype=np.float64)
        if mode != "F":
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent product shots are meant to be seen on white, not on whatever the RGB under
        # alpha=0 happens to be (often black).
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8, order="C")


def encode_jpeg(rgb: np.ndarray, quality: int = 80) -> bytes:
    """Encode an RGB uint8 HxWx3 image as JPEG bytes (live view, thumbnails). Raises ``ImageError``."""
    _check_rgb(rgb)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ImageError(f"JPEG encoding failed for a {rgb.shape[1]}x{rgb.shape[0]} image")
    return buf.tobytes()


def make_thumbnail(rgb: np.ndarray, max_side_px: int = 160) -> bytes:
    """JPEG thumbnail of an RGB image whose longer side is at most ``max_side_px`` (never upscaled)."""
    _check_rgb(rgb)
    height, width = rgb.shape[:2]
    scale = max_side_px / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return encode_jpeg(rgb)


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ImageError(f"expected an RGB uint8 HxWx3 array, got {desc}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"empty image {rgb.shape}")


# ----------------------------------------------------------------------------------------------------
# Frame sources
# ----------------------------------------------------------------------------------------------------

class FrameSource:
    """A stream of RGB uint8 HxWx3 frames. ``read()`` returns None at the end or on failure."""

    description = "frame source"

    def read(self) -> np.ndarray | None:
        """Return the next frame (RGB uint8 HxWx3, contiguous), or None at the end / on failure."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file. Idempotent."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Pacer:
    """Sleeps so that successive frames are ``1/fps`` apart; never bursts to catch up after a delay."""

    def __init__(self, fps: float):
        self.period_s = 1.0 / fps
        self.next_due_s: float | None = None

    def wait(self) -> None:
        now_s = time.monotonic()
        if self.next_due_s is None or now_s - self.next_due_s > self.period_s:
            self.next_due_s = now_s
        elif self.next_due_s > now_s:
            time.sleep(self.next_due_s - now_s)
        self.next_due_s += self.period_s


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """OpenCV frame (BGR, BGRA or gray) → RGB uint8 HxWx3. The one BGR→RGB conversion of the device."""
    if frame.dtype != np.uint8:
        frame = cv2.convertScaleAbs(frame, alpha=255.0 / 65535.0 if frame.dtype == np.uint16 else 1.0)
    if frame.ndim == 2 or frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class _CaptureSource(FrameSource):
    """A cv2.VideoCapture (camera, GStreamer pipeline, network stream)."""

    def __init__(self, cap: cv2.VideoCapture, description: str):
        self._cap = cap
        self.description = description

    def read(self) -> np.ndarray | None:
        """Return the next frame as RGB, or None when the capture fails or ends."""
        if self._cap is None:
            return None
        ok, frame = self._cap.read()
        if not ok or frame is None or frame.size == 0:
            return None
        return _bgr_to_rgb(frame)

    def close(self) -> None:
        """Release the capture. Idempotent."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class _VideoFileSource(_CaptureSource):
    """A video file played in real time (at ``fps`` or the file's own rate), optionally looping."""

    def __init__(self, path: str, fps: float | None, loop: bool):
        self._path = path
        self._loop = loop
        super().__init__(self._open(), f"video file {path}")
        file_fps = self._cap.get(cv2.CAP_PROP_FPS)
        if fps is None:
            fps = file_fps if file_fps and np.isfinite(file_fps) and 0 < file_fps <= 1000 else 25.0
        self._pacer = _Pacer(fps)

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self._path, cv2.CAP_ANY)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"cannot open {self._path!r} as a video file (OpenCV could not decode it)")
        return cap

    def read(self) -> np.ndarray | None:
        """Return the next frame as RGB (paced); at the end restart if looping, else return None."""
        if self._cap is None:
            return None
        ok, frame = self._cap.read()
        if not ok and self._loop:
            # Reopening is more reliable across backends than seeking to frame 0.
            self._cap.release()
            self._cap = self._open()
            ok, frame = self._cap.read()  # a file with no decodable frame ends here, not in a spin
        if not ok or frame is None:
            return None
        self._pacer.wait()
        return _bgr_to_rgb(frame)


class _ImageFolderSource(FrameSource):
    """The images of a directory in name order, shown at ``fps``; unreadable files are skipped."""

    def __init__(self, path: str, fps: float | None, loop: bool, max_pixels: int = DEFAULT_MAX_PIXELS):
        self._dir = Path(path)
        self._loop = loop
        self._max_pixels = max_pixels
        self._pacer = _Pacer(fps or _DEFAULT_FOLDER_FPS)
        self._bad: set[Path] = set()
        self.description = f"image folder {path}"
        self._files = self._list()
        if not self._files:
            raise CameraError(
                f"image folder {path!r} has no image files (.jpg, .png, .webp, ... by extension)"
            )
        self._pos = 0
        self._closed = False

    def _list(self) -> list[Path]:
        return sorted(
            p for p in self._dir.iterdir()
            if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )

    def read(self) -> np.ndarray | None:
        """Return the next readable image as RGB (paced), looping if asked; None when none is left."""
        tried = 0
        while not self._closed and tried <= len(self._files):
            if self._pos >= len(self._files):
                if not self._loop:
                    return None
                self._files = self._list()  # pick up images added or removed meanwhile
                self._pos = 0
                if not self._files:
                    return None
            path = self._files[self._pos]
            self._pos += 1
            tried += 1
            if path in self._bad:
                continue
            try:
                rgb = read_image(path, self._max_pixels)
            except ImageError as exc:
                self._bad.add(path)
                log.warning("skipping unreadable image in folder source: %s", exc)
                continue
            self._pacer.wait()
            return rgb
        return None

    def close(self) -> None:
        """Stop the folder source. Idempotent."""
        self._closed = True


def open_source(
    spec: str,
    *,
    fps: float | None = None,
    loop: bool = True,
    width: int | None = None,
    height: int | None = None,
) -> FrameSource:
    """Open a frame source from a spec string.

    * ``"0"`` or ``"/dev/videoN"``: a V4L2 camera;
    * ``"csi://N"``: a CSI camera through GStreamer (nvarguscamerasrc on Jetson, libcamerasrc elsewhere;
      on a Pi ``csi://<libcamera camera name>`` picks a camera other than the first);
    * ``"rtsp://..."``, ``"http(s)://..."``: a network stream (FFmpeg);
    * a video file: played in real time at ``fps`` (default: the file's rate), restarting if ``loop``;
    * a directory: its images in name order at ``fps`` (default 2), looping if ``loop``.

    ``width``/``height`` (pixels) and ``fps`` are requested from cameras. Raises ``CameraError`` naming
    the spec and what was tried when it cannot be opened.
    """
    if fps is not None and not fps > 0:
        raise CameraError(f"camera {spec!r}: fps must be > 0, got {fps}")
    spec = spec.strip()
    if re.fullmatch(r"\d+", spec) or re.fullmatch(r"/dev/video\d+", spec):
        return _open_v4l2(spec, fps, width, height)
    if spec.startswith("csi://"):
        return _open_csi(spec, fps, width, height)
    if re.match(r"(rtsp|rtsps|http|https)://", spec, re.IGNORECASE):
        return _open_network(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _ImageFolderSource(str(path), fps, loop)
    if path.is_file():
        return _VideoFileSource(str(path), fps, loop)
    raise CameraError(
        f"cannot open camera source {spec!r}: it is not a camera index, /dev/videoN, csi://N, "
        f"rtsp:// or http(s):// URL, and no file or folder of that name exists"
    )


def _open_v4l2(spec: str, fps: float | None, width: int | None, height: int | None) -> FrameSource:
    device = int(spec) if spec.isdigit() else spec
    node = f"/dev/video{device}" if isinstance(device, int) else device
    if not os.path.exists(node):
        raise CameraError(f"cannot open camera {spec!r}: tried V4L2 device {node}, which does not exist")
    cap = cv2.VideoCapture(device, cv2.CAP_V4L2)
    if not cap.isOpened():
        cap.release()
        raise CameraError(
            f"cannot open camera {spec!r}: tried V4L2 device {node} (busy, no permission — is the user "
            f"in the 'video' group? — or not a capture device)"
        )
    if width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    if height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    if fps:
        cap.set(cv2.CAP_PROP_FPS, fps)
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # we want the newest frame, not a backlog
    return _CaptureSource(cap, f"V4L2 camera {node}")


def _is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


@functools.lru_cache(maxsize=1)
def _opencv_has_gstreamer() -> bool:
    match = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
    return bool(match) and match.group(1).upper() == "YES"


def csi_pipeline(sensor: str, width: int, height: int, fps: int, jetson: bool) -> str:
    """The GStreamer pipeline string for a CSI camera (Jetson: nvarguscamerasrc, else libcamerasrc)."""
    if jetson:
        return (
            f"nvarguscamerasrc sensor-id={sensor} ! "
            f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1 ! "
            f"nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1"
        )
    # libcamerasrc has no index property: no name means the first camera.
    name = "" if sensor == "0" else f" camera-name={sensor}"
    return (
        f"libcamerasrc{name} ! video/x-raw,width={width},height={height},framerate={fps}/1 ! "
        f"videoconvert ! video/x-raw,format=BGR ! appsink drop=1"
    )


def _open_csi(spec: str, fps: float | None, width: int | None, height: int | None) -> FrameSource:
    sensor = spec[len("csi://"):]
    jetson = _is_jetson()
    if not sensor or (jetson and not sensor.isdigit()):
        raise CameraError(f"cannot open camera {spec!r}: expected csi://N (N = sensor number)")
    if not jetson and sensor.isdigit() and sensor != "0":
        raise CameraError(
            f"cannot open camera {spec!r}: libcamerasrc selects cameras by name, not number; use "
            f"csi://<name> with a name from `libcamera-hello --list-cameras`"
        )
    pipeline = csi_pipeline(
        sensor,
        width or _DEFAULT_CSI_SIZE_PX[0],
        height or _DEFAULT_CSI_SIZE_PX[1],
        max(1, round(fps)) if fps else _DEFAULT_CSI_FPS,
        jetson,
    )
    if not _opencv_has_gstreamer():
        raise CameraError(
            f"cannot open camera {spec!r}: this OpenCV build has no GStreamer support, needed for the "
            f"pipeline {pipeline!r} (install the distribution's python3-opencv)"
        )
    cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    if not cap.isOpened():
        cap.release()
        raise CameraError(f"cannot open camera {spec!r}: tried GStreamer pipeline {pipeline!r}")
    return _CaptureSource(cap, f"CSI camera {sensor}")


def _open_network(spec: str) -> FrameSource:
    # Timeouts make a dead stream fail instead of hanging; the Camera watchdog remains the backstop.
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _NETWORK_TIMEOUT_MS,
        cv2.CAP_PROP_READ_TIMEOUT_MSEC, _NETWORK_TIMEOUT_MS,
    ]
    cap = cv2.VideoCapture(spec, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise CameraError(f"cannot open stream {_redact(spec)!r}: tried FFmpeg (unreachable, refused or "
                          f"not a video stream)")
    return _CaptureSource(cap, f"stream {_redact(spec)}")


def _redact(url: str) -> str:
    """Hide a password in rtsp://user:password@host URLs, which end up in logs and /api/health."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


# ----------------------------------------------------------------------------------------------------
# Capture thread + watchdog
# ----------------------------------------------------------------------------------------------------

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
    ``opener(spec, fps=, loop=, width=, height=)`` and returns a ``FrameSource``.
    """

    def __init__(
        self,
        spec: str,
        *,
        fps: float | None = None,
        stall_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        loop: bool = True,
        width: int | None = None,
        height: int | None = None,
        opener: Callable[..., FrameSource] = open_source,
    ):
        if stall_timeout_s <= 0 or backoff_initial_s < 0 or backoff_max_s < backoff_initial_s:
            raise ValueError(
                "need stall_timeout_s > 0 and 0 <= backoff_initial_s <= backoff_max_s, got "
                f"{stall_timeout_s}, {backoff_initial_s}, {backoff_max_s}"
            )
        self.spec = spec
        self._name = _redact(spec)
        self._fps = fps
        self._loop = loop
        self._width = width
        self._height = height
        self._opener = opener
        # A deliberately slow source (a folder at 0.1 fps) is not a stalled one.
        self._stall_timeout_s = max(stall_timeout_s, 2.0 / fps) if fps else stall_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s

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

    def status(self) -> dict:
        """Health summary: state, spec, frames_total, fps (measured over the last seconds),
        last_frame_age_s (None before the first frame), reconnects, last_error."""
        now_s = time.monotonic()
        with self._cond:
            recent = [t for t in self._frame_times_s if now_s - t <= _FPS_WINDOW_S]
            span_s = recent[-1] - recent[0] if len(recent) >= 2 else 0.0
            fps = (len(recent) - 1) / span_s if span_s > 0 else 0.0
            latest = self._latest
            return {
                "state": self._state,
                "spec": self._name,
                "frames_total": self._frames_total,
                "fps": round(fps, 2),
                "last_frame_age_s": None if latest is None else round(now_s - latest.timestamp, 3),
                "reconnects": self._reconnects,
                "last_error": self._last_error,
            }

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
        backoff_s = self._backoff_initial_s
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
                backoff_s = self._backoff_initial_s  # it worked for a while: retry quickly
            with self._cond:
                self._last_error = why
                self._set_state("reconnecting", f"{why}; retrying in {backoff_s:.1f} s")
            if self._stop.wait(backoff_s):
                return
            backoff_s = min(backoff_s * 2 if backoff_s else self._backoff_initial_s, self._backoff_max_s)

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
            source = self._opener(
                self.spec, fps=self._fps, loop=self._loop, width=self._width, height=self._height
            )
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
        except Exception as exc:  # a broken driver must not kill the watchdog's reader silently
            reader.error = f"{self._name}: {type(exc).__name__}: {exc}"
        finally:
            if source is not None:
                # Only this thread may release the source: releasing a VideoCapture while another
                # thread is inside read() can crash the process.
                try:
                    source.close()
                except Exception as exc:
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


class VideoWriter:
    """Write RGB frames to an MJPG .avi (demo camera, tests): the RGB→BGR side of the contract, kept here."""

    def __init__(self, path: str | os.PathLike, fps: float, size_wh: tuple[int, int]):
        self.path = str(path)
        self._writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"MJPG"), float(fps), size_wh)
        if not self._writer.isOpened():
            raise CameraError(f"{self.path}: cannot open a video writer (MJPG)")

    def write(self, rgb: np.ndarray) -> None:
        """Append one RGB uint8 frame of the writer's size."""
        _check_rgb(rgb)
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        """Finish the file."""
        self._writer.release()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
