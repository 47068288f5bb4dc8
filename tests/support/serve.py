"""A real ``python -m edge_retrieval serve`` process on 127.0.0.1 (small catalog, image-folder camera) to hit over HTTP,
kill with ``kill -9`` and restart, and a corpus of broken and hostile uploads: shared by tests/test_reliability.py
and ``python -m benchmarks reliability``."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from edge_retrieval.core.config import DEFAULT_BUNDLE
from edge_retrieval.imaging.codec import encode_jpeg
from tests.support.corpus import png_claiming

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """A real ``python -m edge_retrieval serve`` on 127.0.0.1 with a small catalog and an image-folder camera."""

    def __init__(self, work: Path, catalog_dir: Path, extra_config: str = "", *, camera: Path | str | None = None,
                 trigger: bool = False, build_from: bool = True, state: Path | None = None, env: dict | None = None,
                 catalog_extra: str = "", index_extra: str = ""):
        """``camera``: a video, folder or URL to play (default: the first catalog image, still, at 2 fps);
        ``trigger``: look up when the view changes and settles (default: only when asked); ``build_from``: index
        ``catalog_dir`` at start when there is no index (False: the Pi install, built once by the CLI);
        ``state``: where the index, store and history live (default: ``work``); ``env``: added to the environment;
        ``catalog_extra`` / ``index_extra``: more ``catalog:`` / ``index:`` lines (indented)."""
        self.port = free_port()
        self.work = work
        if camera is None:
            camera = work / "cam"
            camera.mkdir(exist_ok=True)
            first = sorted(catalog_dir.glob("*.jpg"))[0]
            (camera / "frame.jpg").write_bytes(first.read_bytes())
        self.state = state or work
        self.env = env or {}
        self.config = work / "config.yaml"
        self.config.write_text(
            f"camera:\n  source: {camera}\n  fps: {10 if trigger else 2}\n"
            f"trigger:\n  enabled: {str(trigger).lower()}\n"
            f"encoder:\n  bundle: {DEFAULT_BUNDLE}\nindex:\n  path: {self.state / 'index'}\n{index_extra}"
            f"catalog:\n  build_from: {catalog_dir if build_from else 'null'}\n"
            f"  enrolled_dir: {self.state / 'enrolled'}\n  store: {self.state / 'catalog.sqlite'}\n{catalog_extra}"
            f"history:\n  dir: {self.state / 'history'}\n"
            f"web:\n  host: 127.0.0.1\n  port: {self.port}\n  api_token: {TOKEN}\n" + extra_config)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_retrieval", "serve", "--config", str(self.config)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.work / "log", "ab"),
                                     env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.work / "log").read_text()[-3000:]
            try:
                self.request("GET", "/api/health")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("serve did not come up")

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def upload(self, path: str, jpeg: bytes, **fields):
        boundary = "----edge-test"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + jpeg + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                                 **(AUTH if path == "/api/catalog" else {})})

    def cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """``python -m edge_retrieval ARGS --config <this server's config>`` (the same state), run to the end."""
        return subprocess.run([sys.executable, "-m", "edge_retrieval", *args, "--config", str(self.config)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **self.env})

    def catalog(self) -> dict[str, str]:
        """id → label of what the running server lists."""
        status, body = self.request("GET", "/api/catalog?limit=1000")
        assert status == 200, body
        return {it["id"]: it["label"] for it in body["items"]}

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its frame header patched to claim ``width`` x ``height``."""
    data = bytearray(encode_jpeg(np.full((32, 32, 3), 128, np.uint8)))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bad_input_corpus(photos: dict[str, np.ndarray]) -> dict[str, tuple[bytes, int, str]]:
    """name → (bytes, expected status, words the error must contain); status 200 = a valid image."""
    astro = Image.fromarray(photos["astronaut"]).resize((256, 256))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    gif_frames = [astro.convert("P"), astro.rotate(90).convert("P")]
    return {
        "empty": (b"", 400, "no data"),
        "text_as_jpeg": (b"hello, I am text pretending to be a JPEG", 400, "not an image"),
        "truncated_jpeg": (encode_jpeg(photos["astronaut"])[:3000], 400, "truncated"),
        "png_claims_20k": (png_claiming(20000, 20000, mode=2), 413, "images.max_pixels"),
        "jpeg_claims_20k": (_jpeg_claiming(20000, 20000), 413, "images.max_pixels"),
        "jpeg_claims_65k": (_jpeg_claiming(65000, 65000), 413, "images.max_pixels"),
        "one_by_one": (_save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), 400, "too small"),
        "strip_40000x1": (_save(Image.new("L", (40000, 1), 90), "PNG"), 400, "too small"),
        "strip_40000x20": (_save(Image.new("L", (40000, 20), 90), "PNG"), 400, "too narrow"),
        "cmyk_jpeg": (_save(astro.convert("CMYK"), "JPEG"), 200, ""),
        "png_16bit": (_save(Image.fromarray(np.asarray(astro.convert("L"), np.uint16) * 257), "PNG"), 200, ""),
        "palette_png": (_save(astro.convert("P"), "PNG"), 200, ""),
        "animated_gif": (_save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:]), 200, ""),
        "exif_rotated": (_save(astro.rotate(90, expand=True), "JPEG", exif=exif), 200, ""),
    }
