"""Synthetic camera views of a catalog image, from a seeded RNG: how a print looks to the device's camera
when it is held up close, tilted, rotated, zoomed, badly lit, colour-cast, blurred, noisy, partly covered,
or lying on a textured table (perhaps partly covered too).

Used at run time (multi-view enrolment: ``padded_view``), by the demo camera, the converter's calibration
and report, the benchmarks and the tests, so all of them see the same views.

API: ``VIEW_KINDS`` names the kinds; ``camera_view(image, kind, rng, out_hw)`` makes one RGB uint8 frame of
``out_hw`` = (height, width) pixels (default 480×640, a VGA camera), deterministic for a given
``np.random.Generator`` state; ``empty_table(rng, out_hw)`` is a frame with no catalog content (an open-set
negative); ``padded_view(image, frac)`` is the image scaled to a fraction of its frame on grey.
"""
from __future__ import annotations

import cv2
import numpy as np

from edge_retrieval.imaging.codec import decode_image, encode_jpeg

VIEW_KINDS = ("closeup", "perspective", "rotate", "zoom", "lighting", "color_cast", "blur", "noise_jpeg",
              "occluded", "table", "table_occluded")
# Views that leave the plane of a flat print held up to the camera: seen at a grazing angle (steep), wrapped
# round the corner of a box (two faces turned away from each other, out-of-plane rotation), or only partly in
# the frame (partial). Benchmarks rate them apart; nothing fits on them.
VIEWPOINT_KINDS = ("steep", "box", "partial")
VGA_HW = (480, 640)


def padded_view(rgb: np.ndarray, frac: float, grey: int = 128) -> np.ndarray:
    """The image scaled to ``frac`` of its size, centred on a grey canvas of the original size (a print seen
    from further away; multi-view enrolment indexes these besides the image itself)."""
    h, w = rgb.shape[:2]
    sh, sw = max(1, int(h * frac)), max(1, int(w * frac))
    canvas = np.full_like(rgb, grey)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    canvas[y0:y0 + sh, x0:x0 + sw] = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    return canvas


def textured_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A table-like texture: wood-grain stripes + noise + a colour, no catalog content."""
    base = rng.uniform(60, 200, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.02, 0.08)
    angle = rng.uniform(0, np.pi)
    grain = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + 3 * np.sin(yy * freq * 0.13))
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), rng.uniform(1, 4))
    tex = grain * rng.uniform(10, 30) + noise * rng.uniform(8, 20)
    return np.clip(base[None, None, :] + tex[..., None], 0, 255).astype(np.uint8)


def _perspective(img: np.ndarray, rng, strength: float, out_hw: tuple[int, int] | None = None,
                 background: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    h, w = img.shape[:2]
    oh, ow = out_hw or (h, w)
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    s = scale * min(oh / h, ow / w)
    cx, cy = ow / 2 + rng.uniform(-0.1, 0.1) * ow * (1 - scale), oh / 2 + rng.uniform(-0.1, 0.1) * oh * (1 - scale)
    dst = np.float32([[cx - w * s / 2, cy - h * s / 2], [cx + w * s / 2, cy - h * s / 2],
                      [cx + w * s / 2, cy + h * s / 2], [cx - w * s / 2, cy + h * s / 2]])
    dst += rng.uniform(-strength, strength, size=(4, 2)).astype(np.float32) * np.float32([w * s, h * s])
    m = cv2.getPerspectiveTransform(src, dst)
    if background is None:
        return cv2.warpPerspective(img, m, (ow, oh), borderMode=cv2.BORDER_REPLICATE)
    out = cv2.warpPerspective(img, m, (ow, oh), dst=background.copy(), borderMode=cv2.BORDER_TRANSPARENT)
    return out


def _occlude(img: np.ndarray, rng, frac: float) -> np.ndarray:
    h, w = img.shape[:2]
    out = img.copy()
    oh, ow = int(h * np.sqrt(frac) * rng.uniform(0.8, 1.2)), int(w * np.sqrt(frac) * rng.uniform(0.8, 1.2))
    y0, x0 = rng.integers(0, max(1, h - oh)), rng.integers(0, max(1, w - ow))
    colour = rng.uniform(0, 255, size=3)
    out[y0:y0 + oh, x0:x0 + ow] = colour  # a hand / a sticky note / another object
    return out


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    return decode_image(encode_jpeg(img, quality))


def _warp_onto(img: np.ndarray, dst: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``img`` warped so its corners land on ``dst`` (tl, tr, br, bl), painted over ``out``."""
    h, w = img.shape[:2]
    m = cv2.getPerspectiveTransform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]), np.float32(dst))
    return cv2.warpPerspective(img, m, (out.shape[1], out.shape[0]), dst=out, borderMode=cv2.BORDER_TRANSPARENT)


def _viewpoint(img: np.ndarray, kind: str, rng: np.random.Generator, out_hw: tuple[int, int]) -> np.ndarray:
    """VIEWPOINT_KINDS: the print leaves the image plane (see there), on a textured table."""
    oh, ow = out_hw
    h, w = img.shape[:2]
    out = textured_background(oh, ow, rng)
    s = min(oh / h, ow / w)
    if kind == "steep":  # tilted 55-70° away: the far edge shrinks and the print is foreshortened
        s *= rng.uniform(0.75, 0.95)
        bw, fh, top = w * s, h * s * rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.5)
        cx, cy = ow / 2 + rng.uniform(-0.08, 0.08) * ow, oh / 2 + rng.uniform(-0.08, 0.08) * oh
        dst = [[cx - bw * top / 2, cy - fh / 2], [cx + bw * top / 2, cy - fh / 2], [cx + bw / 2, cy + fh / 2],
               [cx - bw / 2, cy + fh / 2]]
        if rng.random() < 0.5:  # tilted sideways instead of backwards
            dst = [[ow - x, y] for x, y in dst] if rng.random() < 0.5 else dst
            c = np.mean(dst, axis=0)
            rot = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), float(rng.choice([90, -90])) * oh / ow, 1.0)
            dst = (np.c_[np.float32(dst), np.ones(4)] @ rot.T).tolist()
        return _warp_onto(img, np.float32(dst), out)
    if kind == "box":  # wrapped round the vertical edge of a box turned 30-50° to one side
        s *= rng.uniform(0.7, 0.85)
        split = int(w * rng.uniform(0.35, 0.65))
        cx, cy, hh = ow / 2 + rng.uniform(-0.05, 0.05) * ow, oh / 2, h * s / 2
        lw, rw = split * s * rng.uniform(0.45, 0.8), (w - split) * s * rng.uniform(0.45, 0.8)
        ls, rs = rng.uniform(0.75, 0.9), rng.uniform(0.75, 0.9)  # the far edges look shorter
        out = _warp_onto(np.ascontiguousarray(img[:, :split]),
                         np.float32([[cx - lw, cy - hh * ls], [cx, cy - hh], [cx, cy + hh], [cx - lw, cy + hh * ls]]), out)
        return _warp_onto(np.ascontiguousarray(img[:, split:]),
                          np.float32([[cx, cy - hh], [cx + rw, cy - hh * rs], [cx + rw, cy + hh * rs], [cx, cy + hh]]), out)
    if kind == "partial":  # the print larger than the frame and off-centre: 35-60 % of it in view
        s *= rng.uniform(1.0, 1.3)
        sw, sh = w * s, h * s
        keep = rng.uniform(0.35, 0.6)
        if rng.random() < 0.5:
            x0, y0 = (ow - sw * keep if rng.random() < 0.5 else -sw * (1 - keep)), (oh - sh) / 2
        else:
            x0, y0 = (ow - sw) / 2, (oh - sh * keep if rng.random() < 0.5 else -sh * (1 - keep))
        return _warp_onto(img, np.float32([[x0, y0], [x0 + sw, y0], [x0 + sw, y0 + sh], [x0, y0 + sh]]), out)
    raise ValueError(f"unknown view kind {kind!r}; allowed: {', '.join(VIEW_KINDS + VIEWPOINT_KINDS)}")


def camera_view(img: np.ndarray, kind: str, rng: np.random.Generator,
                out_hw: tuple[int, int] = VGA_HW) -> np.ndarray:
    """A simulated camera frame (RGB uint8, out_hw) of a photo, of one distortion kind (VIEW_KINDS or
    VIEWPOINT_KINDS). Every view ends with mild sensor noise and JPEG, as a real camera frame would."""
    oh, ow = out_hw
    if kind in VIEWPOINT_KINDS:
        v = _viewpoint(img, kind, rng, out_hw)
    elif kind in ("table", "table_occluded"):
        bg = textured_background(oh, ow, rng)
        v = _perspective(img, rng, 0.08, out_hw, background=bg, scale=rng.uniform(0.55, 0.75))
        if kind == "table_occluded":
            v = _occlude(v, rng, 0.12)
    else:
        v = _perspective(img, rng, 0.02, out_hw, scale=1.0)
        if kind == "perspective":
            v = _perspective(img, rng, 0.12, out_hw)
        elif kind == "rotate":
            m = cv2.getRotationMatrix2D((ow / 2, oh / 2), rng.uniform(-25, 25), rng.uniform(1.0, 1.25))
            v = cv2.warpAffine(v, m, (ow, oh), borderMode=cv2.BORDER_REFLECT)
        elif kind == "zoom":
            f = rng.uniform(0.6, 0.8)
            ch, cw = int(oh * f), int(ow * f)
            y0, x0 = rng.integers(0, oh - ch), rng.integers(0, ow - cw)
            v = cv2.resize(v[y0:y0 + ch, x0:x0 + cw], (ow, oh), interpolation=cv2.INTER_LINEAR)
        elif kind == "lighting":
            gain, bias, gamma = rng.uniform(0.6, 1.4), rng.uniform(-30, 30), rng.uniform(0.7, 1.5)
            x = np.clip((v.astype(np.float32) * gain + bias) / 255.0, 0, 1) ** gamma
            v = (x * 255).astype(np.uint8)
        elif kind == "color_cast":
            cast = rng.uniform(0.75, 1.25, size=3)
            v = np.clip(v.astype(np.float32) * cast[None, None, :], 0, 255).astype(np.uint8)
        elif kind == "blur":
            v = cv2.GaussianBlur(v, (0, 0), rng.uniform(1.5, 3.0))
        elif kind == "noise_jpeg":
            v = np.clip(v.astype(np.float32) + rng.normal(0, 12, v.shape), 0, 255).astype(np.uint8)
            v = _jpeg(v, int(rng.integers(20, 40)))
        elif kind == "occluded":
            v = _occlude(v, rng, 0.2)
        elif kind != "closeup":
            raise ValueError(f"unknown view kind {kind!r}; allowed: {', '.join(VIEW_KINDS)}")
    v = np.clip(v.astype(np.float32) + rng.normal(0, 3, v.shape), 0, 255).astype(np.uint8)
    return _jpeg(v, 85)


def empty_table(rng: np.random.Generator, out_hw: tuple[int, int] = VGA_HW) -> np.ndarray:
    """A camera frame of an empty textured table (open-set negative)."""
    return _jpeg(textured_background(out_hw[0], out_hw[1], rng), 85)
