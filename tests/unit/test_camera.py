"""edge_retrieval/imaging/codec.py decoding, the BGR→RGB contract of every source (edge_retrieval/capture/sources.py), and the capture
watchdog (edge_retrieval/capture/camera.py)."""
from __future__ import annotations

import io
import logging
import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from edge_retrieval.capture.camera import Camera, Frame
from edge_retrieval.capture.sources import FrameSource, open_source, redact
from edge_retrieval.core.config import CameraConfig
from edge_retrieval.core.errors import CameraError, ImageError
from edge_retrieval.imaging.codec import decode_image, encode_jpeg, make_thumbnail, read_image

RED_RGB = (220, 20, 30)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(rgb: np.ndarray, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, **save_kwargs)
    return buf.getvalue()


def _wait_until(predicate, timeout_s: float = 10.0) -> bool:
    """Poll until predicate() is true; the timeout is only a hang guard, not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# ---------------------------------------------------------------------------------------------------
# decode_image / read_image
# ---------------------------------------------------------------------------------------------------

def test_jpeg_round_trip_gives_rgb_uint8_close_to_original():
    photo = data.astronaut()
    rgb = decode_image(_jpeg(photo))
    assert rgb.shape == photo.shape and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert np.abs(rgb.astype(int) - photo.astype(int)).mean() < 4


def test_png_with_alpha_and_grayscale_become_rgb():
    photo = data.chelsea()
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # a transparent corner
    out = decode_image(_png(Image.fromarray(rgba, "RGBA")))
    assert out.shape == photo.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[20:, 20:], photo[20:, 20:])
    assert (out[:10, :10] == 255).all()  # transparent → white

    gray = data.camera()
    out = decode_image(_png(Image.fromarray(gray, "L")))
    assert out.shape == gray.shape + (3,)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 2], gray)


def test_palette_cmyk_and_16bit_images_become_rgb():
    photo = data.coffee()
    for img in (Image.fromarray(photo).convert("P"), Image.fromarray(photo).convert("CMYK")):
        buf = io.BytesIO()
        img.save(buf, "JPEG" if img.mode == "CMYK" else "PNG", **({"quality": 95} if img.mode == "CMYK" else {}))  # TIFF uploads: 415
        out = decode_image(buf.getvalue())
        assert out.shape == photo.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - photo.astype(int)).mean() < 20
    gray16 = data.camera().astype(np.uint16) * 257
    out = decode_image(_png(Image.fromarray(gray16)))
    np.testing.assert_array_equal(out[..., 1], data.camera())  # scaled, not clipped at 255


def test_truncated_jpeg_is_an_error_not_a_grey_image():
    jpeg = _jpeg(data.astronaut())
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(jpeg[: len(jpeg) // 2])


@pytest.mark.parametrize(
    "payload", [b"", np.random.default_rng(0).bytes(5000), b"hello, not an image\n" * 20]
)
def test_non_image_bytes_are_rejected(payload):
    with pytest.raises(ImageError, match="not an image"):
        decode_image(payload)


def test_over_max_pixels_is_rejected_from_the_header():
    # A PNG claiming 9000x9000 with 16 bytes of pixel data: only a header check can say "too big"
    # (decoding would report a corrupt image, or try to allocate 243 MB, instead).
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", b"\x00" * 16)
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageError, match=r"9000x9000 = 81.0 MP, over the limit of 40.0 MP"):
        decode_image(header, max_pixels=40_000_000)
    huge = header.replace(struct.pack(">II", 9000, 9000), struct.pack(">II", 20000, 20000))
    huge = huge[:8] + chunk(b"IHDR", huge[16:29]) + huge[33:]  # fix the CRC
    with pytest.raises(ImageError, match="too large"):  # Pillow's own bomb guard, converted
        decode_image(huge, max_pixels=500_000_000)
    with pytest.raises(ImageError, match="over the limit of 0.1 MP"):
        decode_image(_jpeg(data.astronaut()), max_pixels=100_000)


def test_exif_orientation_is_applied():
    photo = data.rocket()  # 427x640, not square
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    out = decode_image(_jpeg(photo, exif=exif.tobytes()))
    assert out.shape == (photo.shape[1], photo.shape[0], 3)


def test_read_image_names_the_file(tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(_png(Image.fromarray(data.chelsea())))
    assert read_image(good).shape == data.chelsea().shape
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.jpg"):
        read_image(bad)
    with pytest.raises(ImageError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_encode_jpeg_and_thumbnail_keep_rgb_order():
    red = np.zeros((120, 300, 3), np.uint8)
    red[...] = RED_RGB
    back = decode_image(encode_jpeg(red))
    assert back[60, 150, 0] > 180 and back[60, 150, 2] < 80
    thumb = decode_image(make_thumbnail(data.astronaut(), max_side_px=64))
    assert thumb.shape == (64, 64, 3)
    with pytest.raises(ImageError):
        encode_jpeg(np.zeros((4, 4), np.uint8))


# ---------------------------------------------------------------------------------------------------
# Frame sources
# ---------------------------------------------------------------------------------------------------

def _write_video(path, frames_rgb, fps=10.0) -> None:
    h, w = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for rgb in frames_rgb:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # VideoWriter takes BGR
    writer.release()


@pytest.fixture
def red_video(tmp_path):
    red = np.zeros((96, 128, 3), np.uint8)
    red[...] = RED_RGB
    frames = [red] * 3 + [cv2.resize(data.chelsea(), (128, 96))] * 2  # 5 frames
    path = tmp_path / "clip.avi"
    _write_video(path, frames)
    return path


def _is_red(rgb: np.ndarray) -> bool:
    r, g, b = rgb.reshape(-1, 3).mean(axis=0)
    return r > 180 and g < 60 and b < 80


def test_video_file_source_is_rgb_and_ends_without_loop(red_video):
    with open_source(str(red_video), fps=1000, loop=False) as src:
        frames = []
        while (rgb := src.read()) is not None:
            frames.append(rgb)
            assert len(frames) < 100
        assert src.read() is None
    assert len(frames) == 5
    first = frames[0]
    assert first.shape == (96, 128, 3) and first.dtype == np.uint8 and first.flags.c_contiguous
    assert _is_red(first)


def test_video_file_source_loops(red_video):
    with open_source(str(red_video), fps=1000, loop=True) as src:
        frames = [src.read() for _ in range(12)]
    assert all(f is not None for f in frames)
    assert _is_red(frames[0]) and _is_red(frames[5]) and _is_red(frames[10])  # restarted at 5 and 10
    assert not _is_red(frames[4])


def test_image_folder_source_sorted_rgb_skips_bad_and_loops(tmp_path, caplog):
    red = np.zeros((50, 70, 3), np.uint8)
    red[...] = RED_RGB
    Image.fromarray(red).save(tmp_path / "1_red.png")
    (tmp_path / "2_broken.jpg").write_bytes(b"this is not a jpeg")
    Image.fromarray(data.coffee()).save(tmp_path / "3_coffee.jpg")
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING, logger="edge_retrieval.capture.camera"):
        with open_source(str(tmp_path), fps=1000) as src:
            frames = [src.read() for _ in range(5)]
    assert _is_red(frames[0]) and frames[0].shape == (50, 70, 3)
    assert frames[1].shape == data.coffee().shape
    assert _is_red(frames[2]) and frames[3].shape == data.coffee().shape  # looped, broken skipped
    assert sum("2_broken.jpg" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_open_source_errors_name_the_spec(tmp_path):
    with pytest.raises(CameraError, match="no-such-clip.mp4"):
        open_source(str(tmp_path / "no-such-clip.mp4"))
    with pytest.raises(CameraError, match="no image files"):
        open_source(str(tmp_path))
    with pytest.raises(CameraError, match="/dev/video97"):
        open_source("/dev/video97")
    not_video = tmp_path / "clip.avi"
    not_video.write_text("not a video")
    with pytest.raises(CameraError, match="clip.avi"):
        open_source(str(not_video))


# ---------------------------------------------------------------------------------------------------
# Camera: capture thread + watchdog
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def unblock():
    """Released at teardown so fake sources blocked 'forever' let their threads end."""
    event = threading.Event()
    yield event
    event.set()


class FakeSource(FrameSource):
    """Gives ``n_frames`` photos, then blocks forever (a dead RTSP stream) or returns None (unplugged)."""

    def __init__(self, photo: np.ndarray, n_frames: int, then: str, unblock: threading.Event):
        self.photo, self.n_frames, self.then, self.unblock = photo, n_frames, then, unblock
        self.sent = 0
        self.closed = False

    def read(self):
        if self.sent >= self.n_frames:
            if self.then == "block":
                self.unblock.wait()
            return None
        self.sent += 1
        time.sleep(0.005)
        return self.photo

    def close(self):
        self.closed = True


class FakeOpener:
    def __init__(self, then: str, unblock: threading.Event, n_frames: int = 5):
        self.then, self.unblock, self.n_frames = then, unblock, n_frames
        self.sources: list[FakeSource] = []
        self.kwargs: dict = {}

    def __call__(self, spec, **kwargs):
        self.kwargs = kwargs
        src = FakeSource(data.astronaut(), self.n_frames, self.then, self.unblock)
        self.sources.append(src)
        return src


def _fast_camera(spec, opener, **kw) -> Camera:
    return Camera(CameraConfig(source=spec, stall_timeout_s=0.3, backoff_initial_s=0.02, backoff_max_s=0.1, **kw),
                  opener=opener)


@pytest.mark.parametrize("then", ["block", "none"])
def test_camera_reconnects_after_stall_or_end(then, unblock, caplog):
    opener = FakeOpener(then, unblock)
    with caplog.at_level(logging.INFO, logger="edge_retrieval.capture.camera"):
        with _fast_camera("fake://cam", opener) as cam:
            first = cam.wait_frame(0, timeout_s=10)
            assert isinstance(first, Frame) and first.rgb.shape == (512, 512, 3)
            assert not first.rgb.flags.writeable
            assert _wait_until(lambda: cam.status().reconnects >= 2)
            seen = cam.latest().index
            later = cam.wait_frame(seen, timeout_s=10)
            assert later is not None and later.index > seen  # new frames after reconnecting
            status = cam.status()
            assert status.frames_total >= 10 and status.last_error
            assert status.spec == "fake://cam" and status.last_frame_age_s is not None
    prefix = "camera fake://cam: "
    states = [r.getMessage()[len(prefix):].split(" ")[0]
              for r in caplog.records if r.getMessage().startswith(prefix)]
    assert states[:4] == ["starting", "streaming", "reconnecting", "streaming"]
    assert cam.state == "stopped"
    assert opener.kwargs == {"fps": None, "loop": True, "width": None, "height": None, "max_pixels": 16_000_000,
                             "hold_s": 2.0}
    if then == "none":
        assert all(s.closed for s in opener.sources)


def test_stop_returns_while_a_reader_is_blocked(unblock):
    opener = FakeOpener("block", unblock, n_frames=1)
    cam = Camera(CameraConfig(source="fake://dead", stall_timeout_s=60), opener=opener).start()
    assert cam.wait_frame(0, timeout_s=10) is not None
    assert _wait_until(lambda: opener.sources[0].sent == 1)
    cam.stop()  # the reader is stuck in read(): stop must not wait for it
    assert cam.state == "stopped"
    cam.stop()  # idempotent
    assert cam.wait_frame(10**6, timeout_s=0.05) is None


def test_camera_with_unopenable_spec_keeps_retrying(tmp_path):
    spec = str(tmp_path / "missing.mp4")
    cam = Camera(CameraConfig(source=spec, stall_timeout_s=0.3, backoff_initial_s=0.01, backoff_max_s=0.05))
    with cam:
        assert _wait_until(lambda: cam.status().reconnects >= 3)
        assert cam.state == "reconnecting"
        assert "missing.mp4" in cam.status().last_error
        assert cam.latest() is None
    assert cam.state == "stopped"


def test_camera_streams_a_real_video_file_as_rgb(red_video):
    with Camera(CameraConfig(source=str(red_video), fps=100, stall_timeout_s=2)) as cam:
        frame = cam.wait_frame(0, timeout_s=10)
        assert frame is not None and _is_red(frame.rgb)
        assert _wait_until(lambda: cam.status().frames_total > 6)  # past the end: looped
        assert cam.status().reconnects == 0 and cam.status().fps > 0


def test_jpeg_decoded_at_reduced_scale_keeps_both_sides_above_the_minimum():
    import skimage.data

    from edge_retrieval.imaging.codec import decode_image, encode_jpeg
    big = np.ascontiguousarray(np.tile(skimage.data.astronaut(), (2, 2, 1))[:768, :1024])
    data = encode_jpeg(big, 90)
    assert decode_image(data).shape == (768, 1024, 3)
    small = decode_image(data, min_side_px=224)
    assert small.shape == (384, 512, 3)  # 1/2 scale: 1/4 would make the short side 192 < 224
    ref = cv2.resize(big, (512, 384), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(small.astype(np.float32) - ref).mean() < 6


@pytest.mark.parametrize("url, shown", [
    ("rtsp://admin:p@ssX@cam.local:554/live", "rtsp://admin:***@cam.local:554/live"),  # "@" in the password
    ("rtsp://admin:pa/X@cam.local/live", "rtsp://admin:***@cam.local/live"),  # "/" in the password
    ("rtsp://:X@cam.local", "rtsp://:***@cam.local"),  # no user name
    ("RTSP://admin:X@10.0.0.5/s", "RTSP://admin:***@10.0.0.5/s"),
    ("rtsp://X@cam.local/s", "rtsp://***@cam.local/s"),  # a lone userinfo may be a token
    ("rtsp://cam.local/cam/realmonitor?channel=1&user=admin&password=X",
     "rtsp://cam.local/cam/realmonitor?channel=1&user=admin&password=***"),
    ("http://cam/snap?PWD=X&Passwd=X&pass=X&api_key=X&token=X&secret=X&Auth=X&size=2",
     "http://cam/snap?PWD=***&Passwd=***&pass=***&api_key=***&token=***&secret=***&Auth=***&size=2"),
    ("rtsp://u:X@cam/s?e=a@b&pwd=X", "rtsp://u:***@b&pwd=***"),  # "@" after the host: hide more, never less
    ("rtsp://cam/s?pwd=se:X@y", "rtsp://***@y"),  # ...and never keeps a "user name" that is a query
    ("rtsp://cam.local:554/live", "rtsp://cam.local:554/live"),
    ("/dev/video0", "/dev/video0"),
    ("0", "0"),
])
def test_redact_hides_every_password_form(url, shown):
    assert redact(url) == shown
    assert "X" not in redact(url).replace("RTSP", "")


def test_an_unopenable_source_names_its_spec_without_the_password(tmp_path):
    for spec in ("rtps://admin:p@ssX@cam/live",):  # a typo in the scheme: not a stream, not a file
        with pytest.raises(CameraError) as info:
            open_source(spec)
        assert "p@ssX" not in str(info.value) and "ssX" not in str(info.value)
    with pytest.raises(CameraError) as info:
        open_source("rtsp://admin:p@ssX@cam/live", fps=0)
    assert "ssX" not in str(info.value)
