"""Every decoder under a limit: only the allow-listed formats are decoded, sizes come from the header before any
pixel, containers (ICO, TIFF pages, animated frames) cannot smuggle a bigger image past the check, and thousands
of mutated files of every format give a clean 4xx — never another exception, never a 5xx."""
from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from edge_retrieval.core.errors import ImageError
from edge_retrieval.imaging.codec import UPLOAD_FORMATS, _jpeg_coefficient_bytes, decode_image, read_image
from tests.conftest import ROOT, web_client
from tests.support.corpus import allocation_bombs, bombs, ico_bomb, mutations, valid_files
from tests.support.serve import AUTH

FUZZ_FILES = 5000
FUZZ_BUDGET_S = 40.0


def _outcome(data: bytes, **kw) -> int:
    """200 when it decodes to RGB, else the ImageError's status; any other exception fails the test."""
    try:
        rgb = decode_image(data, **kw)
    except ImageError as e:
        return e.http_status
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
    return 200


@pytest.mark.parametrize("name", sorted(bombs()))
def test_bombs_are_refused_from_their_header(name):
    data, statuses = bombs()[name]
    t0 = time.perf_counter()
    assert _outcome(data) in statuses, name
    assert _outcome(data, min_side_px=224) in statuses, name
    assert time.perf_counter() - t0 < 1.0, name  # refused from the header, not after decoding


def test_the_ico_bomb_costs_no_memory():
    bomb = ico_bomb(full=True)  # the real thing: a full 13300x13300 RGBA stream, ~700 KB
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.http_status == 415 and "ICO" in str(e.value)
    growth, status = _growth_mb(bomb)
    assert status == 415 and growth < 20, growth


# Peak memory is measured in a fresh child process: in the test process, threads other tests left behind (an
# appliance winding down, a server) allocate meanwhile and would be counted as the decode's.
_MEASURE = """
import sys
from pathlib import Path
from PIL import Image
from edge_retrieval.core.errors import ImageError
from edge_retrieval.imaging.codec import decode_image
Image.init()  # every decoder plugin loaded before the baseline
def hwm():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
data = sys.stdin.buffer.read()
side = None if sys.argv[1] == "none" else int(sys.argv[1])
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = hwm()
try:
    decode_image(data, min_side_px=side)
    status = 200
except ImageError as e:
    status = e.http_status
print(status, (hwm() - before) / 1024)
"""


def _growth_mb(data: bytes, min_side_px: int | None = None) -> tuple[float, int]:
    """Peak RSS growth (VmHWM reset first) of decoding ``data`` in a fresh process, and the outcome."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(min_side_px).lower()], input=data, capture_output=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    status, growth = out.stdout.decode().split()
    return float(growth), int(status)


@pytest.mark.parametrize("name", sorted(allocation_bombs()))
def test_decodes_that_would_allocate_hundreds_of_mb_are_refused_before_any_pixel(name):
    data = allocation_bombs()[name]
    for side in (224, None):
        growth, status = _growth_mb(data, min_side_px=side)
        assert status == 413 and growth < 10, (name, side, status, growth)
    with pytest.raises(ImageError, match="decoding it would take .* MB"):
        decode_image(data, min_side_px=224)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_the_largest_files_a_decode_budget_allows_stay_under_100_mb():
    """Just under the budget (5 bytes × images.max_pixels): each decodes, none grows the process by 100 MB."""
    files = {"jpeg_progressive_420_25mp": _save(Image.new("RGB", (5000, 5000), (9, 99, 199)), "JPEG", progressive=True),
             "jpeg_progressive_cmyk_9mp": _save(Image.new("CMYK", (3000, 3000), (1, 2, 3, 4)), "JPEG", progressive=True),
             "webp_lossless_4.8mp": _save(Image.new("RGB", (2200, 2200), (9, 99, 199)), "WEBP", lossless=True)}
    if "AVIF" in UPLOAD_FORMATS:
        files["avif_5.3mp"] = _save(Image.new("RGB", (2300, 2300), (9, 99, 199)), "AVIF", quality=30, speed=10)
    for name, data in files.items():
        growth, status = _growth_mb(data, min_side_px=224)
        assert status == 200 and growth < 100, (name, status, growth)


def test_a_multi_scan_baseline_jpeg_counts_its_coefficient_buffer():
    """A baseline JPEG whose first scan holds one component of three buffers every coefficient like a progressive
    one: its SOS is rewritten to name one component, and the estimate counts the whole image's coefficients."""
    data = _save(Image.new("RGB", (4000, 4000), (9, 99, 199)), "JPEG", subsampling=0)
    assert _jpeg_coefficient_bytes(io.BytesIO(data)) == 0  # interleaved: decoded a band at a time
    sos = data.index(b"\xff\xda")
    one_scan = bytearray(data)
    one_scan[sos + 4] = 1  # Ns: one component in this scan
    assert _jpeg_coefficient_bytes(io.BytesIO(bytes(one_scan))) == 4000 * 4000 * 3 * 2


def test_allowed_formats_decode_and_multi_frame_files_give_their_first_frame():
    files = valid_files()
    for name in ("jpeg", "png", "png_rgba", "png_palette", "apng", "gif", "webp", "webp_lossless",
                 "webp_animated") + (("avif",) if "AVIF" in UPLOAD_FORMATS else ()):
        assert _outcome(files[name]) == 200, name
    first = decode_image(files["apng"])
    assert first.shape == (96, 128, 3)  # frame 0 (the others are rotated, 128x96 → 96x128 or equal)
    for name in ("ico", "jpeg2000", "spider", "tiff_pages", "bmp", "tga", "pcx", "sgi", "dds", "qoi", "im"):
        assert _outcome(files[name]) in (400, 415), name  # never handed to those decoders
    assert _outcome(files["ico"]) == 415 and _outcome(files["jpeg2000"]) == 415


def test_the_devices_own_folders_also_read_tiff_and_bmp(tmp_path):
    files = valid_files()
    for name, suffix in (("tiff_pages", ".tif"), ("bmp", ".bmp"), ("ico", ".ico")):
        (tmp_path / f"x{suffix}").write_bytes(files[name])
    assert read_image(tmp_path / "x.tif").shape == (96, 128, 3)  # its first page
    assert read_image(tmp_path / "x.bmp").shape == (96, 128, 3)
    with pytest.raises(ImageError, match="ICO"):
        read_image(tmp_path / "x.ico")


def test_mutated_files_of_every_format_give_a_clean_4xx_or_an_image():
    counts: dict[int, int] = {}
    tried = 0
    for _, data in mutations(valid_files(), count=FUZZ_FILES, seed=1, budget_s=FUZZ_BUDGET_S):
        status = _outcome(data, min_side_px=224 if tried % 2 else None)
        assert status in (200, 400, 413, 415), status
        counts[status] = counts.get(status, 0) + 1
        tried += 1
    assert tried >= 500, f"only {tried} mutations in {FUZZ_BUDGET_S} s"
    assert counts.get(400, 0) > 0 and counts.get(200, 0) > 0


def test_no_upload_endpoint_answers_5xx_to_bombs_or_mutations(appliance):
    client = web_client(appliance)
    corpus = [(n, d) for n, (d, _) in bombs().items()]
    corpus += list(mutations(valid_files(), count=400, seed=7, budget_s=20))
    for name, data in corpus:
        for url, fields, headers in (("/api/query", {}, {}),
                                     ("/api/catalog", {"label": "fuzz", "id": "fuzz/x"}, AUTH)):
            r = client.post(url, headers=headers, data={"image": (io.BytesIO(data), "x.bin"), **fields})
            assert r.status_code < 500, (name, url, r.status_code, r.get_json())
    assert client.get("/api/health").status_code == 200
