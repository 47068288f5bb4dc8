"""Frame sources: V4L2 cameras, CSI cameras through GStreamer, network streams, video files and image folders,
opened from one spec string (``open_source``), and the video writer of the demo camera and the tests.

This is the ONLY module of the project where OpenCV's BGR frames become RGB (``_bgr_to_rgb``): every frame
handed out here is RGB ``uint8`` HxWx3 and C-contiguous, so the rest of the device never has to think about
colour order. Still images (uploads, catalog files) are decoded to the same contract by edge_retrieval/imaging/codec.py.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import time
import urllib.parse
from pathlib import Path

import cv2
import numpy as np

from edge_retrieval.core.errors import CameraError, ImageError
from edge_retrieval.imaging.codec import DEFAULT_MAX_PIXELS, check_rgb, is_image_file, read_image

log = logging.getLogger(__name__)

_DEFAULT_FOLDER_FPS = 2.0  # images/s of a folder whose images are not held (camera.hold_s: 0)
_DEFAULT_HELD_FOLDER_FPS = 5.0  # frames/s of a folder whose images are held in view
_DEFAULT_CSI_SIZE_PX = (1280, 720)
_DEFAULT_CSI_FPS = 30
_NETWORK_TIMEOUT_MS = 5000


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
    """The images of a directory in name order, each held in view for ``hold_s`` (repeated at ``fps`` frames/s,
    as a camera would see a print laid down and left there, so the trigger sees a still view); ``hold_s`` 0 =
    each image is one frame, ``fps`` images/s. Unreadable files are skipped."""

    def __init__(self, path: str, fps: float | None, loop: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
                 hold_s: float = 0.0):
        self._dir = Path(path)
        self._loop = loop
        self._max_pixels = max_pixels
        fps = fps or (_DEFAULT_HELD_FOLDER_FPS if hold_s > 0 else _DEFAULT_FOLDER_FPS)
        self._pacer = _Pacer(fps)
        self._frames_per_image = max(1, round(hold_s * fps))
        self._held: np.ndarray | None = None
        self._repeats_left = 0
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
        return sorted(p for p in self._dir.iterdir() if is_image_file(p.name) and p.is_file())

    def read(self) -> np.ndarray | None:
        """Return the next frame as RGB (paced): the image held in view, else the next readable one, looping if
        asked; None when none is left."""
        if self._held is not None and self._repeats_left > 0 and not self._closed:
            self._repeats_left -= 1
            self._pacer.wait()
            return self._held
        rgb = self._next_image()
        self._held, self._repeats_left = rgb, self._frames_per_image - 1
        return rgb

    def _next_image(self) -> np.ndarray | None:
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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hold_s: float = 0.0,
) -> FrameSource:
    """Open a frame source from a spec string.

    * ``"0"`` or ``"/dev/videoN"``: a V4L2 camera;
    * ``"csi://N"``: a CSI camera through GStreamer (nvarguscamerasrc on Jetson, libcamerasrc elsewhere;
      on a Pi ``csi://<libcamera camera name>`` picks a camera other than the first);
    * ``"rtsp://..."``, ``"http(s)://..."``: a network stream (FFmpeg);
    * a video file: played in real time at ``fps`` (default: the file's rate), restarting if ``loop``;
    * a directory: its images in name order, each held in view for ``hold_s`` seconds at ``fps`` frames/s
      (default 5; with ``hold_s`` 0 each image is one frame, at ``fps`` images/s, default 2), looping if ``loop``.

    ``width``/``height`` (pixels) and ``fps`` are requested from cameras; a folder's images decode to at most
    ``max_pixels`` (``images.max_pixels``; a larger one is skipped like an unreadable one). Raises ``CameraError`` naming
    the spec and what was tried when it cannot be opened.
    """
    if fps is not None and not fps > 0:
        raise CameraError(f"camera {redact(spec)!r}: fps must be > 0, got {fps}")
    spec = spec.strip()
    if re.fullmatch(r"\d+", spec) or re.fullmatch(r"/dev/video\d+", spec):
        return _open_v4l2(spec, fps, width, height)
    if spec.startswith("csi://"):
        return _open_csi(spec, fps, width, height)
    if re.match(r"(rtsp|rtsps|http|https)://", spec, re.IGNORECASE):
        return _open_network(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _ImageFolderSource(str(path), fps, loop, max_pixels, hold_s)
    if path.is_file():
        return _VideoFileSource(str(path), fps, loop)
    raise CameraError(
        f"cannot open camera source {redact(spec)!r}: it is not a camera index, /dev/videoN, csi://N, "
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
        raise CameraError(f"cannot open stream {redact(spec)!r}: tried FFmpeg (unreachable, refused or "
                          f"not a video stream)")
    return _CaptureSource(cap, f"stream {redact(spec)}")


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_SECRET_PARAM = re.compile(r"pass|pwd|token|key|secret|auth", re.IGNORECASE)
_PARAM = re.compile(r"(?<=[?&;])([^=&;#?]*)=([^&;#]*)")


def redact(url: str) -> str:
    """``url`` with its credentials hidden (a camera spec ends up in logs, /api/health, /api/status and events).

    Everything between ``scheme://`` and the last ``@`` is the userinfo — passwords may hold ``@``, ``/`` or
    ``:`` unescaped — and becomes ``user:***`` (``***`` without a ``:``, which may be a token); a query
    parameter named like a secret (pass, pwd, token, key, secret, auth, any case) keeps its name, not its value.
    An ``@`` further on (in a query) hides more than the userinfo, never less. Not a URL: unchanged."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    head, rest = url[:scheme.end()], url[scheme.end():]
    userinfo, at, rest = rest.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        keep_user = colon and not re.search(r"[/?#&;=]", user)
        head += f"{user}:***@" if keep_user else "***@"
    return head + _PARAM.sub(
        lambda m: f"{m[1]}=***" if _SECRET_PARAM.search(urllib.parse.unquote(m[1])) else m[0], rest)


class VideoWriter:
    """Write RGB frames to an MJPG .avi (demo camera, tests): the RGB→BGR side of the contract, kept here."""

    def __init__(self, path: str | os.PathLike, fps: float, size_wh: tuple[int, int]):
        self.path = str(path)
        self._writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"MJPG"), float(fps), size_wh)
        if not self._writer.isOpened():
            raise CameraError(f"{self.path}: cannot open a video writer (MJPG)")

    def write(self, rgb: np.ndarray) -> None:
        """Append one RGB uint8 frame of the writer's size."""
        check_rgb(rgb)
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        """Finish the file."""
        self._writer.release()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
