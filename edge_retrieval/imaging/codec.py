"""Image I/O of the device: decoding with size/pixel limits and EXIF orientation, reduced-scale JPEG decoding,
JPEG encoding, thumbnails, and the one list of image file suffixes.

Only an allow-list of decoders ever sees the bytes (``UPLOAD_FORMATS`` for uploads; ``FILE_FORMATS`` adds BMP and
TIFF for the device's own folders), and each image's size is checked from its header before any pixel is decoded:
Pillow's ICO, JPEG 2000 or SPIDER decoders (some decode inside ``Image.open``) are never tried. A multi-frame file
(animated GIF/PNG/WebP, MPO, TIFF pages) gives its first frame only.

Everything decoded here is RGB ``uint8`` HxWx3 and C-contiguous. Camera frames come from edge_retrieval/capture/sources.py,
the only place where OpenCV's BGR frames become RGB; the RGB→BGR step of ``encode_jpeg`` only feeds OpenCV's
encoder.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from edge_retrieval.core.config import ImagesConfig
from edge_retrieval.core.errors import ImageError

# Library callers (tests, benches, the converter) get the configured default; the device passes images.max_pixels.
DEFAULT_MAX_PIXELS: int = ImagesConfig.model_fields["max_pixels"].default

MIN_SIDE_PX = 16  # smaller images carry nothing to recognise
MAX_ASPECT = 20  # a 40000x1 strip is not a photo of anything
# A JPEG decoded at reduced scale needs only the decoded pixels in memory: its header may claim this many
# times the pixel limit (a 200 MP phone photo decodes at 1/4 or 1/8 scale).
_DRAFT_HEADER_FACTOR = 16

# The files an image folder (catalog, camera folder source, enrolled originals) is made of, by suffix.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# What a camera or a phone sends (AVIF only where this Pillow has it; HEIF needs a plugin the device lacks).
# Pillow's JPEG decoder also opens camera JPEGs with a second (preview) image, as format "MPO".
UPLOAD_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF") + (
    ("AVIF",) if features.check("avif") else ())
FILE_FORMATS: tuple[str, ...] = UPLOAD_FORMATS + ("BMP", "TIFF")  # the device's own folders (catalog, camera)
# What a decode may allocate, per pixel of ``max_pixels`` (80 MB at 16 MP): a full-size RGBA image of the limit
# fits, and so does a progressive JPEG's coefficient buffer up to ~26 MP. A file whose decode would take more is
# refused from its header (413), whatever its pixel count: see ``_decode_bytes``.
DECODE_BYTES_PER_PIXEL = 5
# Bytes per pixel of a Pillow image of each mode (RGB is stored as 4 bytes a pixel).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# What Pillow's WebP and AVIF decoders allocate a pixel of their canvas besides the image, measured: libwebp's
# animation decoder keeps two RGBA canvases and hands over a copy of the frame (16 MP: +245 MB); libavif holds the
# YUV planes (up to 12-bit 4:4:4, 6 bytes) and an RGB copy (16 MP 8-bit 4:2:0: +144 MB).
_CODEC_BYTES = {"WEBP": 12, "AVIF": 10}
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC excluded)
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# No header may claim more than this, whatever the caller's limit (a JPEG decoded at 1/8 scale included); Pillow's
# own bomb check (it errors over twice MAX_IMAGE_PIXELS) is set to the same ceiling as a backstop.
MAX_HEADER_PIXELS = 16 * DEFAULT_MAX_PIXELS
Image.MAX_IMAGE_PIXELS = MAX_HEADER_PIXELS // 2

# A truncated upload must fail loudly rather than come back as a half-grey picture that then gets
# "matched"; something else in the process could have flipped this global, so pin it.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own (smaller, configurable) pixel limit from the header, before decoding; Pillow's warning is
# noise, and its error (over ~358 MP) stays as a backstop.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def is_image_file(name: str) -> bool:
    """Whether a file name has one of the image suffixes and is not hidden (dot-files are never images)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, min_side_px: int | None = None) -> np.ndarray:
    """Decode image bytes (an upload, a stored file) into RGB uint8 HxWx3.

    Sizes are checked from the header before any pixel is decoded, EXIF orientation is applied, and every
    mode (L, LA, P, RGBA, CMYK, 16-bit) ends up as RGB (alpha is composited onto white).

    ``min_side_px`` is for callers that downscale anyway: the image comes back only as large as needed to keep
    both sides ≥ this. A JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (its header may
    claim up to ``16 × max_pixels`` as long as the decoded pixels stay within ``max_pixels``); other formats
    are reduced right after decoding, before the colour conversion — so memory per request stays bounded.
    Raises ``ImageError`` for empty, non-image, truncated/corrupt (400), a format outside ``UPLOAD_FORMATS`` (415),
    too large (413), too small or too narrow input — whatever a decoder raises on broken data.
    """
    if not data:
        raise ImageError("not an image (or unsupported format): no data")
    return _decode(io.BytesIO(data), max_pixels, min_side_px)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file into RGB uint8 HxWx3 (see ``decode_image``; ``FILE_FORMATS``).

    Raises ``ImageError`` naming the file when it is missing, unreadable, not an image or too large.
    """
    try:
        with open(path, "rb") as fp:
            return _decode(fp, max_pixels, formats=FILE_FORMATS)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}", http_status=exc.http_status) from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file: {exc.strerror or exc}") from exc


def check_shape(width: int, height: int) -> None:
    """Refuse images with nothing to recognise: a side under MIN_SIDE_PX, or longer than MAX_ASPECT × the
    other (a 40000×1 strip). Raises ``ImageError`` (400) stating the rule."""
    if min(width, height) < MIN_SIDE_PX:
        raise ImageError(f"image is {width}x{height} px: too small to recognise (each side must be at least "
                         f"{MIN_SIDE_PX} px)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(f"image is {width}x{height} px: too narrow to recognise (the longer side may be at most "
                         f"{MAX_ASPECT}x the shorter)")


def _over_limit(width: int, height: int, limit: int, what: str) -> ImageError:
    return ImageError(f"image is {width}x{height} = {width * height / 1e6:.1f} MP{what}, over the limit of "
                      f"{limit / 1e6:.1f} MP (images.max_pixels)", http_status=413)


def _unsupported(prefix: bytes, formats: tuple[str, ...]) -> str | None:
    """The name of a format Pillow knows but ``formats`` leaves out, from the magic bytes of ``prefix`` alone
    (each plugin's own prefix test; nothing is decoded). None when no other format claims the bytes."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if name not in formats and accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a plugin's prefix test that chokes on odd bytes claims nothing
            continue
    return None


def _webp_size(prefix: bytes) -> tuple[int, int] | None:
    """A WebP canvas from its first chunk header: libwebp allocates the canvas inside ``Image.open``."""
    if prefix[:4] != b"RIFF" or prefix[8:12] != b"WEBP" or len(prefix) < 30:
        return None
    chunk = prefix[12:16]
    if chunk == b"VP8 " and prefix[23:26] == b"\x9d\x01\x2a":
        return struct.unpack("<H", prefix[26:28])[0] & 0x3FFF, struct.unpack("<H", prefix[28:30])[0] & 0x3FFF
    if chunk == b"VP8X":
        return int.from_bytes(prefix[24:27], "little") + 1, int.from_bytes(prefix[27:30], "little") + 1
    if chunk == b"VP8L" and prefix[20] == 0x2F:
        bits = struct.unpack("<I", prefix[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_coefficient_bytes(fp: BinaryIO) -> int:
    """What libjpeg's whole-image coefficient buffer will take: a progressive JPEG, or a baseline one whose first
    scan holds fewer components than the frame, keeps every DCT coefficient of the full-size image (2 bytes each)
    until the last scan — at any decoding scale. 0 for a single-scan JPEG (decoded a band of rows at a time).
    Reads the markers up to the first scan from ``fp`` (then rewinds it); nothing is decoded."""
    frame, progressive = None, False
    try:
        fp.seek(2)  # after SOI
        for _ in range(10_000):  # a file of empty segments must not spin
            head = fp.read(2)
            while len(head) == 2 and head[0] == 0xFF and head[1] == 0xFF:  # fill bytes
                head = head[1:] + fp.read(1)
            if len(head) < 2 or head[0] != 0xFF:
                return 0  # not where a marker should be: the decoder will refuse the file
            marker = head[1]
            if 0xD0 <= marker <= 0xD7 or marker == 0x01:
                continue
            length = int.from_bytes(fp.read(2), "big")
            if length < 2:
                return 0
            body = fp.read(length - 2) if marker in _JPEG_SOF or marker == 0xDA else None
            if body is None:
                fp.seek(length - 2, os.SEEK_CUR)
            elif marker in _JPEG_SOF and frame is None:
                frame, progressive = body, marker in _JPEG_PROGRESSIVE
            elif marker == 0xDA:
                if frame is None or len(frame) < 6 or not body:
                    return 0
                height, width = struct.unpack(">HH", frame[1:5])
                comps = [(frame[i + 1] >> 4, frame[i + 1] & 15) for i in range(6, min(len(frame), 6 + 3 * frame[5]), 3)]
                if not comps or not (progressive or body[0] < len(comps)):
                    return 0
                hmax, vmax = max(1, max(c[0] for c in comps)), max(1, max(c[1] for c in comps))
                blocks = 0
                for h, v in ((max(h, 1), max(v, 1)) for h, v in comps):  # libjpeg's jdiv_round_up, jround_up
                    bw, bh = -(-width * h // (hmax * 8)), -(-height * v // (vmax * 8))
                    blocks += -(-bw // h) * h * (-(-bh // v) * v)
                return blocks * 64 * 2
        return 0
    finally:
        fp.seek(0)


def _decode_bytes(img: Image.Image, fp: BinaryIO, full_size: tuple[int, int]) -> int:
    """What decoding ``img`` (opened, drafted) will allocate: the image at its decoded size, plus a progressive or
    multi-scan JPEG's coefficient buffer, plus the WebP/AVIF decoders' own canvases — known before any pixel."""
    out = img.size[0] * img.size[1] * _MODE_BYTES.get(img.mode, 4)
    if img.format in ("JPEG", "MPO"):
        return out + _jpeg_coefficient_bytes(fp)
    return out + full_size[0] * full_size[1] * _CODEC_BYTES.get(img.format or "", 0)


def _open(fp: BinaryIO, max_pixels: int, formats: tuple[str, ...]) -> Image.Image:
    """``Image.open`` with only the decoders of ``formats``, after a header check where the decoder allocates
    in ``open`` (WebP). Everything a decoder raises becomes ``ImageError`` (400; 415 for another format)."""
    prefix = fp.read(64)
    fp.seek(0)
    size = _webp_size(prefix)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _over_limit(*size, max_pixels, "")
    try:
        return Image.open(fp, formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large ({exc}); the limit is {max_pixels / 1e6:.1f} MP (images.max_pixels)",
                         http_status=413) from exc
    except UnidentifiedImageError as exc:
        other = _unsupported(prefix, formats)
        if other is not None:
            raise ImageError(f"unsupported image format {other} (accepted: {', '.join(formats)})",
                             http_status=415) from exc
        raise ImageError(f"not an image (or unsupported format; accepted: {', '.join(formats)})") from exc
    except MemoryError as exc:
        raise ImageError("not enough memory to read the image header", http_status=413) from exc
    except Exception as exc:
        raise ImageError(f"not an image (or a corrupt header): {type(exc).__name__}: {exc}") from exc


def _decode(fp: BinaryIO, max_pixels: int, min_side_px: int | None = None, *,
            formats: tuple[str, ...] = UPLOAD_FORMATS) -> np.ndarray:
    img = _open(fp, max_pixels, formats)
    with img:
        width, height = img.size
        check_shape(width, height)
        draft = bool(min_side_px) and img.format in ("JPEG", "MPO")
        header_limit = min(max_pixels * _DRAFT_HEADER_FACTOR if draft else max_pixels, MAX_HEADER_PIXELS)
        if width * height > header_limit:
            raise _over_limit(width, height, header_limit, "")
        try:
            if draft:
                img.draft(img.mode, (min_side_px, min_side_px))
                if img.size[0] * img.size[1] > max_pixels:
                    raise _over_limit(width, height, max_pixels, f" (decoded at {img.size[0]}x{img.size[1]})")
            need = _decode_bytes(img, fp, (width, height))
            if need > max_pixels * DECODE_BYTES_PER_PIXEL:
                raise ImageError(
                    f"image is {width}x{height} {img.format}{' (progressive)' if img.info.get('progressive') else ''}"
                    f": decoding it would take {need / 2**20:.0f} MB, over the {max_pixels * DECODE_BYTES_PER_PIXEL / 2**20:.0f}"
                    f" MB a decode may use ({DECODE_BYTES_PER_PIXEL} bytes × images.max_pixels)", http_status=413)
            img.load()
            if min_side_px:
                img = _reduce(img, min_side_px)
            if img.getexif().get(0x0112, 1) != 1:  # Orientation; exif_transpose copies even an upright image
                img = ImageOps.exif_transpose(img)
            return _to_rgb_array(img)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image is too large ({exc})", http_status=413) from exc
        except MemoryError as exc:
            raise ImageError(f"image is {width}x{height}: not enough memory to decode it", http_status=413) from exc
        except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, ... on bad data
            raise ImageError(f"truncated or corrupt image: {exc}") from exc


def _reduce(img: Image.Image, min_side_px: int) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps both sides ≥ ``min_side_px``, in bands of rows and
    before any full-size conversion: reducing RGBA in one go premultiplies a full-size copy, and expanding a
    palette or a 16-bit image at full size would multiply the memory of a large upload."""
    factor = min(img.size) // min_side_px
    if factor < 2:
        return img
    w, h = (img.size[0] // factor) * factor, (img.size[1] // factor) * factor
    try:
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # no box filter for these: subsample
            out = img.resize((w // factor, h // factor), Image.Resampling.NEAREST, box=(0, 0, w, h))
        else:
            target = ("RGBA" if "transparency" in img.info else "RGB") if img.mode == "P" else img.mode
            out = Image.new(target, (w // factor, h // factor))
            rows = factor * max(1, 256 // factor)
            for y in range(0, h, rows):
                band = img.crop((0, y, w, min(y + rows, h)))
                out.paste((band if band.mode == target else band.convert(target)).reduce(factor), (0, y // factor))
    except ValueError:  # a mode Pillow cannot reduce: convert at full size instead
        return img
    out.info, out.format = img.info, img.format  # keep the EXIF orientation for exif_transpose
    return out


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        # Pillow's own conversion clips 16-bit values at 255 (a white picture); scale instead.
        values = np.asarray(img, dtype=np.float32)
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
    check_rgb(rgb)
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ImageError(f"JPEG encoding failed for a {rgb.shape[1]}x{rgb.shape[0]} image")
    return buf.tobytes()


def make_thumbnail(rgb: np.ndarray, max_side_px: int) -> bytes:
    """JPEG thumbnail of an RGB image whose longer side is at most ``max_side_px`` (never upscaled)."""
    check_rgb(rgb)
    height, width = rgb.shape[:2]
    scale = max_side_px / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return encode_jpeg(rgb)


def check_rgb(rgb: np.ndarray) -> None:
    """Raise ``ImageError`` unless ``rgb`` is a non-empty RGB uint8 HxWx3 array (the pixel contract)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ImageError(f"expected an RGB uint8 HxWx3 array, got {desc}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"empty image {rgb.shape}")
