"""The demo: a catalog of real photos that ship inside pip packages, and a demo camera video of simulated
camera views of them (device/synthetic_views.py).

The photos are also the tests', the converter's and the benchmarks' offline data. Needs the ``demo`` extra
(scikit-image, scikit-learn); matplotlib's sample photo is used when matplotlib is installed.
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from .camera_sources import VideoWriter
from .images import encode_jpeg
from .synthetic_views import VGA_HW, camera_view, empty_table


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


DEMO_HELD_OUT = ("coffee", "grace_hopper", "china")  # shown to the demo camera, never enrolled


def materialise_demo(root: str | Path, *, seconds_per_view: float = 3.0, fps: float = 10.0,
                     seed: int = 0) -> tuple[Path, Path]:
    """Write the demo catalog (real photos as JPEG files) and a demo camera video (MJPG .avi) of simulated
    camera views: catalog items close up, tilted, on a table, plus photos NOT in the catalog and an empty
    table. Idempotent: existing files are kept. Returns (catalog_dir, video_path)."""
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
        h, w = VGA_HW
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
