"""The demo: a catalog of the real photos that ship inside pip packages (edge_retrieval/imaging/shipped_photos.py)
and a demo camera video of simulated camera views of them (edge_retrieval/imaging/synthetic_views.py).
Needs the ``demo`` extra (scikit-image, scikit-learn)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_retrieval.capture.sources import VideoWriter
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.imaging.shipped_photos import shipped_photos
from edge_retrieval.imaging.synthetic_views import VGA_HW, camera_view, empty_table

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
