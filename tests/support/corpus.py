"""Decoder bombs and a seeded fuzz corpus: crafted files that made decoders allocate hundreds of MB or raise
odd exceptions (an ICO whose 256x256 entry holds a 13300x13300 PNG, a 16 MP JPEG 2000 of a few hundred bytes,
headers claiming huge canvases), valid small files of every format Pillow writes here, and mutations of them
from a seeded RNG. Shared by tests/test_decoders.py and ``python -m benchmarks reliability``."""
from __future__ import annotations

import functools
import io
import struct
import time
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image, features


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, *, mode: int = 6, full: bool = False) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (colour type ``mode``, 8 bit). ``full``: with the whole
    zero-filled pixel stream (a real bomb: ~0.1 % of its decoded size), else a token IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    if full:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[mode]
        z, row, parts = zlib.compressobj(9), b"\0" * (1 + width * channels), []
        for _ in range(height):
            parts.append(z.compress(row))
        idat = b"".join(parts) + z.flush()
    else:
        idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def ico_bomb(side: int = 13300, *, full: bool = False) -> bytes:
    """An ICO with one directory entry that says 256x256 (0 = 256) and holds a ``side`` x ``side`` RGBA PNG."""
    png = png_claiming(side, side, full=full)
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def allocation_bombs() -> dict[str, bytes]:
    """Valid files whose pixel count passes ``images.max_pixels`` (16 MP) but whose decode allocates far more:
    a progressive JPEG keeps every DCT coefficient of the full image at any decoding scale (CMYK: 8 bytes a pixel),
    libwebp's decoders keep two full RGBA canvases, libavif the YUV planes and an RGB copy. Flat colour: tiny."""
    rgb = Image.new("RGB", (4000, 4000), (120, 30, 200))
    out = {"jpeg_progressive_cmyk_11mp": _save(Image.new("CMYK", (3400, 3400), (10, 20, 30, 40)), "JPEG",
                                               progressive=True),
           "jpeg_progressive_444_16mp": _save(rgb, "JPEG", progressive=True, subsampling=0),
           "webp_lossless_16mp": _save(rgb, "WEBP", lossless=True),
           "webp_animated_6mp": _save(rgb.crop((0, 0, 2400, 2400)), "WEBP", save_all=True,
                                      append_images=[Image.new("RGB", (2400, 2400), (0, 30, 200))])}
    if features.check("avif"):
        out["avif_16mp"] = _save(rgb, "AVIF", quality=30, speed=10)
    return out


@functools.cache
def bombs() -> dict[str, tuple[bytes, tuple[int, ...]]]:
    """name → (bytes, the statuses that are a right answer): every one must be refused."""
    jp2 = _save(Image.new("RGB", (4000, 4000)), "JPEG2000")  # 16 MP in a few hundred bytes
    webp = bytearray(_save(Image.new("RGB", (64, 64), (200, 10, 10)), "WEBP", lossless=True))
    bits = (16383 - 1) | ((16383 - 1) << 14)  # VP8L header claiming the largest canvas
    webp[21:25] = struct.pack("<I", bits | (struct.unpack("<I", bytes(webp[21:25]))[0] & ~0x0FFFFFFF))
    gif = bytearray(_save(Image.new("P", (32, 32)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen
    return {
        "ico_13300_png": (ico_bomb(), (415,)),
        "jpeg2000_16mp": (jp2, (415,)),
        "png_claims_13300_rgba": (png_claiming(13300, 13300), (413,)),
        "webp_claims_16383": (bytes(webp), (400, 413)),
        "gif_screen_65535": (bytes(gif), (400, 413)),
        "tiff": (_save(Image.new("RGB", (64, 64)), "TIFF"), (415,)),
        "bmp": (_save(Image.new("RGB", (64, 64)), "BMP"), (415,)),
        "psd_like": (b"8BPS\0\1" + b"\0" * 6 + struct.pack(">HIIHH", 3, 30000, 30000, 8, 3), (415, 400)),
        **{name: (data, (413,)) for name, data in allocation_bombs().items()},
    }


def valid_files(seed: int = 0) -> dict[str, bytes]:
    """Small valid files of every format Pillow writes here (the fuzzer's seeds), animated ones included."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).resize((128, 96))
    frames = [base, base.rotate(90), base.rotate(180)]
    out = {"jpeg": _save(base, "JPEG", quality=80), "png": _save(base, "PNG"), "png_rgba": _save(base.convert("RGBA"), "PNG"),
           "png_palette": _save(base.convert("P"), "PNG"), "apng": _save(base, "PNG", save_all=True, append_images=frames[1:]),
           "gif": _save(base.convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]]),
           "webp": _save(base, "WEBP"), "webp_lossless": _save(base, "WEBP", lossless=True),
           "webp_animated": _save(base, "WEBP", save_all=True, append_images=frames[1:]),
           "tiff_pages": _save(base, "TIFF", save_all=True, append_images=frames[1:]), "bmp": _save(base, "BMP"),
           "ico": _save(base, "ICO"), "jpeg2000": _save(base, "JPEG2000"), "spider": _save(base.convert("F"), "SPIDER"),
           "tga": _save(base, "TGA"), "ppm": _save(base, "PPM"), "pcx": _save(base, "PCX"), "sgi": _save(base, "SGI"),
           "dds": _save(base.convert("RGBA"), "DDS"), "qoi": _save(base, "QOI"), "im": _save(base, "IM")}
    if features.check("avif"):
        out["avif"] = _save(base, "AVIF", quality=50)
    return out


def mutations(seeds: dict[str, bytes], *, count: int, seed: int = 0, budget_s: float = 30.0
              ) -> Iterator[tuple[str, bytes]]:
    """Up to ``count`` mutated files (byte flips, header flips, truncations, repeated or deleted runs, random
    ints written at random places) from a seeded RNG, for at most ``budget_s`` of the caller's time."""
    rng = np.random.default_rng(seed)
    names = sorted(seeds)
    deadline = time.monotonic() + budget_s
    for n in range(count):
        if time.monotonic() > deadline:
            return
        name = names[n % len(names)]
        data = bytearray(seeds[name])
        kind = int(rng.integers(0, 6))
        if kind == 0:  # a few random bytes anywhere
            for _ in range(int(rng.integers(1, 9))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        elif kind == 1:  # the header: where sizes, counts and offsets live
            for _ in range(int(rng.integers(1, 5))):
                data[int(rng.integers(0, min(64, len(data))))] = int(rng.integers(0, 256))
        elif kind == 2:  # truncated
            data = data[:int(rng.integers(1, len(data)))]
        elif kind == 3:  # a run repeated
            a = int(rng.integers(0, len(data)))
            data[a:a] = data[a:a + int(rng.integers(1, 200))] * int(rng.integers(2, 50))
        elif kind == 4:  # a run deleted
            a = int(rng.integers(0, len(data)))
            del data[a:a + int(rng.integers(1, 100))]
        else:  # a big or odd 32-bit number written over a field
            at = int(rng.integers(0, max(1, len(data) - 4)))
            value = int(rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 65535, 65536, int(rng.integers(0, 2**32))]))
            data[at:at + 4] = struct.pack(rng.choice(["<I", ">I"]), value)
        yield f"{name}#{n}", bytes(data)
