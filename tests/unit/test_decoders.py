"""Every decoder under a limit: only the allow-listed formats are decoded, sizes come from the header before any
pixel, containers (ICO, TIFF pages, animated frames) cannot smuggle a bigger image past the check, and thousands
of mutated files of every format give a clean 4xx — never another exception, never a 5xx."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.core.errors import ImageError
from edge_retrieval.imaging.codec import UPLOAD_FORMATS, decode_image, read_image
from tests.conftest import web_client
from tests.support.corpus import bombs, ico_bomb, mutations, valid_files
from tests.support.serve import AUTH

FUZZ_FILES = 5000
FUZZ_BUDGET_S = 40.0


def _hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


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
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _hwm_kb()
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.http_status == 415 and "ICO" in str(e.value)
    assert (_hwm_kb() - before) / 1024 < 20


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
