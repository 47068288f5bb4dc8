"""Real photos that ship inside pip packages, and simulated camera views of them.

Used by the demo (catalog + fake camera), the tests, the converter's calibration/report and the benchmarks,
so every one of them sees the same deterministic data. Needs the ``demo`` extra (scikit-image,
scikit-learn); matplotlib's sample photo is used when matplotlib is installed.
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

VIEW_KINDS = ("closeup", "perspective", "rotate", "zoom", "lighting", "color_cast", "blur", "noise_jpeg",
              "occluded", "table", "table_occluded")


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.shape[2] == 4:
        img = img[..., :3]
    return np.ascontiguousarray(img)


def shipped_photos() -> dict[str, np.ndarray]:
    """Name → RGB uint8 photo, from scikit-image, scikit-learn and matplotlib (all offline)."""
    import skimage.data as sd
    photos: dict[str, np.ndarray] = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "camera", "coins", "moon", "clock", "page", "text", "brick", "grass", "gravel",
                 "cell", "logo", "colorwheel"):
        try:
            photos[name] = _rgb(getattr(sd, name)())
        except Exception:  # noqa: BLE001 - an item that needs a download is skipped offline
            continue
    try:
        from sklearn.datasets import load_sample_images
        for fname, img in zip(load_sample_images().filenames, load_sample_images().images):
            photos[Path(fname).stem] = _rgb(img)
    except ImportError:
        pass
    try:
        import matplotlib.cbook
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            from PIL import Image
            photos["grace_hopper"] = _rgb(np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB")))
    except Exception:  # noqa: BLE001 - matplotlib is optional
        pass
    return photos


def photo_crops(photos: dict[str, np.ndarray], per_photo: int, seed: int = 0, min_frac: float = 0.35,
                size_px: int = 320) -> dict[str, np.ndarray]:
    """Distinct items cut from the shipped photos: random square-ish crops (deterministic). A handful of
    photos becomes a catalog of many different-looking items."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, img in photos.items():
        h, w = img.shape[:2]
        for i in range(per_photo):
            f = rng.uniform(min_frac, 0.6)
            ch, cw = int(h * f), int(w * f * rng.uniform(0.8, 1.25))
            cw = min(cw, w)
            y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = img[y0:y0 + ch, x0:x0 + cw]
            scale = size_px / max(crop.shape[:2])
            out[f"{name}_{i:02d}"] = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return out


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
    from .camera import decode_image, encode_jpeg
    return decode_image(encode_jpeg(img, quality))


def camera_view(img: np.ndarray, kind: str, rng: np.random.Generator,
                out_hw: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A simulated camera frame (RGB uint8, out_hw) of a photo, of one distortion kind (VIEW_KINDS).
    Every view ends with mild sensor noise and JPEG, as a real camera frame would."""
    oh, ow = out_hw
    if kind in ("table", "table_occluded"):
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


def empty_table(rng: np.random.Generator, out_hw: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A camera frame of an empty textured table (open-set negative)."""
    return _jpeg(textured_background(out_hw[0], out_hw[1], rng), 85)


DEMO_HELD_OUT = ("coffee", "grace_hopper", "china")  # shown to the demo camera, never enrolled


def materialise_demo(root: str | Path, *, seconds_per_view: float = 3.0, fps: float = 10.0,
                     seed: int = 0) -> tuple[Path, Path]:
    """Write the demo catalog (real photos as JPEG files) and a demo camera video (MJPG .avi) of simulated
    camera views: catalog items close up, tilted, on a table, plus photos NOT in the catalog and an empty
    table. Idempotent: existing files are kept. Returns (catalog_dir, video_path)."""
    from .camera import VideoWriter, encode_jpeg
    root = Path(root)
    catalog, video = root / "catalog", root / "camera.avi"
    photos = shipped_photos()
    if not catalog.is_dir():
        tmp = root / ".catalog.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for name, img in photos.items():
            if name not in DEMO_HELD_OUT:
                (tmp / f"{name}.jpg").write_bytes(encode_jpeg(img, 92))
        tmp.rename(catalog)
    if not video.is_file():
        rng = np.random.default_rng(seed)
        shown = ["astronaut", "chelsea", "rocket", "coffee", "hubble_deep_field", "grace_hopper", None,
                 "immunohistochemistry", "flower", "china"]
        kinds = ["closeup", "perspective", "table", "rotate", "lighting", "table_occluded"]
        h, w = 480, 640
        tmp_video = root / ".camera.tmp.avi"
        writer = VideoWriter(tmp_video, fps, (w, h))
        prev = None
        for i, name in enumerate(n for n in shown if n is None or n in photos):
            view = empty_table(rng, (h, w)) if name is None else camera_view(photos[name], kinds[i % len(kinds)], rng, (h, w))
            if prev is not None:  # a short swipe between views: the trigger sees motion, then stillness
                for t in np.linspace(0, 1, int(fps * 0.6)):
                    shift = int(t * w)
                    frame = np.concatenate([prev[:, shift:], view[:, :shift]], axis=1)
                    writer.write(np.ascontiguousarray(frame))
            for _ in range(int(fps * seconds_per_view)):
                noisy = np.clip(view.astype(np.int16) + rng.integers(-2, 3, view.shape), 0, 255).astype(np.uint8)
                writer.write(noisy)
            prev = view
        writer.close()
        tmp_video.rename(video)
    return catalog, video
