"""Real photos that ship inside pip packages (scikit-image, scikit-learn, matplotlib): the demo's catalog and
the offline data of the tests, the converter and the benchmarks. Needs the ``demo`` extra (scikit-image,
scikit-learn); matplotlib's sample photo is used when matplotlib is installed."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from edge_retrieval.core.errors import ConfigError


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.shape[2] == 4:
        img = img[..., :3]
    return np.ascontiguousarray(img)


def shipped_photos() -> dict[str, np.ndarray]:
    """Name → RGB uint8 photo, from scikit-image, scikit-learn and matplotlib (all offline). Raises ConfigError
    naming the ``demo`` extra when scikit-image is not installed."""
    try:
        import skimage.data as sd
    except ImportError:
        raise ConfigError("the demo's photos come from scikit-image, which is not installed: "
                          "pip install 'edge-retrieval[demo]' (or set camera.source and catalog.demo: false)") from None
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
