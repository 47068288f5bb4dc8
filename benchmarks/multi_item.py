"""Several catalog prints on one table: ``python -m benchmarks multi_item [--frames N] [--bundle DIR]``.

Frames (480×640, seeded, cached under var/bench/multi_item): 2, 3 or 4 prints of the camera-view benchmark's
queried items (crops of the photos that ship in scikit-image / scikit-learn / matplotlib) pasted with a random
perspective warp and rotation onto a textured table (``imaging/synthetic_views.textured_background``), not
overlapping; a third of the frames also hold a print of an unknown photo (a training-pool wallpaper of
gnome-backgrounds / ukui-wallpapers, never in the catalog). The index is the camera-view benchmark's 286-item
catalog (its 220 distractors are other crops of the same photos: hard negatives), built with the default
settings. Nothing is fitted here: the lookup runs with the shipped thresholds; the search's own settings are
rated per source of the prints (scikit-image frames / scikit-learn + matplotlib frames) so a choice made on one
half can be checked on the other.

Rated, per number of prints: item recall (catalog prints named with the right id), false items per frame (named
items that are not in the frame, the unknown print included), frames answered exactly (every catalog print and
nothing else), outlines with IoU ≥ 0.5 against the true print corners (of the right items found), and the time
per lookup. ``--single`` rates the lookup with ``multi_item: false`` beside it (what a lookup named before).
Writes benchmarks/results/multi_item_NAME.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.views import CACHE, REPO, camera_view_set, write_json
from edge_retrieval.core.config import DEFAULT_BUNDLE

VERSION = 1
HW = (480, 640)
SKIMAGE_FREE = ("china", "flower", "grace_hopper")  # the photos of scikit-learn and matplotlib


def _place(n: int, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[np.ndarray] | None:
    """Corners (tl, tr, br, bl) in pixels of ``n`` prints of the given (h, w) on the frame, not overlapping."""
    oh, ow = HW
    boxes, quads = [], []
    long_px = {2: (190, 260), 3: (160, 220), 4: (140, 190), 5: (130, 170)}[n]
    for h, w in sizes:
        for _ in range(200):
            s = rng.uniform(*long_px) / max(h, w)
            bw, bh = w * s, h * s
            cx, cy = rng.uniform(bw / 2 + 4, ow - bw / 2 - 4), rng.uniform(bh / 2 + 4, oh - bh / 2 - 4)
            box = (cx - bw * 0.6, cy - bh * 0.6, cx + bw * 0.6, cy + bh * 0.6)  # room for the tilt below
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes):
                break
        else:
            return None
        boxes.append(box)
        corners = np.float32([[-bw / 2, -bh / 2], [bw / 2, -bh / 2], [bw / 2, bh / 2], [-bw / 2, bh / 2]])
        corners += rng.uniform(-0.07, 0.07, size=(4, 2)).astype(np.float32) * np.float32([bw, bh])
        a = np.deg2rad(rng.uniform(-15, 15))
        rot = np.float32([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        quads.append(corners @ rot.T + np.float32([cx, cy]))
    return quads


def make_frames(n_frames: int, seed: int = 0) -> tuple[Path, list[dict], Path]:
    """The frames (cached), their ground truth, and the catalog folder they are rated against."""
    from edge_retrieval.convert.images import MAX_PIXELS, training_pool_files
    from edge_retrieval.core.errors import ImageError
    from edge_retrieval.imaging.codec import encode_jpeg, read_image
    from edge_retrieval.imaging.synthetic_views import textured_background
    data = camera_view_set()
    root = CACHE / "multi_item"
    meta = root / "frames.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("version") == VERSION and saved.get("frames_asked") == n_frames:
            return root, saved["frames"], data.catalog
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    items = sorted(p for p in (data.catalog / "q").glob("*/*.jpg"))
    groups = {"skimage": [p for p in items if not p.stem.startswith(SKIMAGE_FREE)],
              "sklearn+mpl": [p for p in items if p.stem.startswith(SKIMAGE_FREE)]}
    unknown = []
    for path in training_pool_files()[:40]:
        try:
            img = read_image(path, MAX_PIXELS)
        except ImageError:
            continue
        scale = 320 / max(img.shape[:2])
        unknown.append(cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_frames):
        n = 2 + i % 3
        group = "sklearn+mpl" if i % 4 == 3 else "skimage"
        chosen = [groups[group][j] for j in rng.choice(len(groups[group]), size=n, replace=False)]
        prints = [read_image(p, MAX_PIXELS) for p in chosen]
        with_unknown = bool(unknown) and i % 3 == 1
        if with_unknown:
            prints.append(unknown[int(rng.integers(len(unknown)))])
        quads = _place(len(prints), rng, [p.shape[:2] for p in prints])
        if quads is None:
            continue
        frame = textured_background(*HW, rng)
        for img, q in zip(prints, quads):
            h, w = img.shape[:2]
            m = cv2.getPerspectiveTransform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]), q)
            frame = cv2.warpPerspective(img, m, (HW[1], HW[0]), dst=frame, borderMode=cv2.BORDER_TRANSPARENT)
        frame = np.clip(frame.astype(np.float32) + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8)
        path = root / f"frame_{i:03d}.jpg"
        path.write_bytes(encode_jpeg(frame, 85))
        truth = [{"id": f"q/{p.stem}", "quad": (q / np.float32([HW[1], HW[0]])).round(4).tolist()}
                 for p, q in zip(chosen, quads)]
        frames.append({"path": path.name, "prints": n, "group": group, "unknown": with_unknown, "truth": truth})
    meta.write_text(json.dumps({"version": VERSION, "frames_asked": n_frames, "frames": frames}, indent=1) + "\n")
    return root, frames, data.catalog


def iou(a, b) -> float:
    """IoU of two convex quads (frame fractions)."""
    pa, pb = np.asarray(a, np.float32), np.asarray(b, np.float32)
    inter, _ = cv2.intersectConvexConvex(pa, pb)
    union = cv2.contourArea(pa) + cv2.contourArea(pb) - inter
    return float(inter / union) if union > 0 else 0.0


def rate(answers: list[dict], frames: list[dict]) -> dict:
    """The rates of one mode over ``frames`` (answers in the same order)."""
    out = {}
    for key, keep in (("all", lambda f: True), ("2", lambda f: f["prints"] == 2), ("3", lambda f: f["prints"] == 3),
                      ("4", lambda f: f["prints"] == 4), ("skimage", lambda f: f["group"] == "skimage"),
                      ("sklearn+mpl", lambda f: f["group"] == "sklearn+mpl"), ("with_unknown", lambda f: f["unknown"])):
        pairs = [(a, f) for a, f in zip(answers, frames) if keep(f)]
        if not pairs:
            continue
        found = false = exact = good_outline = 0
        prints = sum(f["prints"] for _, f in pairs)
        for a, f in pairs:
            truth = {t["id"]: t["quad"] for t in f["truth"]}
            named = {m["id"]: m.get("quad") for m in a["matches"]}
            right = [i for i in named if i in truth]
            found += len(right)
            false += len(named) - len(right)
            exact += set(named) == set(truth)
            good_outline += sum(named[i] is not None and iou(named[i], truth[i]) >= 0.5 for i in right)
        ms = [a["ms"] for a, _ in pairs]
        out[key] = {"frames": len(pairs), "prints": prints, "item_recall": round(found / prints, 3),
                    "false_items_per_frame": round(false / len(pairs), 3), "exact_frames": round(exact / len(pairs), 3),
                    "outline_iou50": round(good_outline / found, 3) if found else None,
                    "median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Make the frames, build the catalog's index, look every frame up, print and write the rates."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks multi_item", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--single", action="store_true", help="also rate the lookup with multi_item: false")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="a recognition setting for this run, e.g. --set multi_crop_px=112 (repeatable)")
    args = ap.parse_args(argv)
    from edge_retrieval.app import wiring
    from edge_retrieval.core.config import BuildConfig, Config, IndexConfig, RecognitionConfig
    from edge_retrieval.imaging.codec import read_image
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    root, frames, catalog = make_frames(args.frames)
    import yaml
    index_rc = RecognitionConfig()
    rc = RecognitionConfig(**{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    enc = Encoder.from_bundle(args.bundle, num_threads=2)
    path = CACHE / "multi_item_index" / enc.manifest.name
    if not (path / "current").exists():
        wiring.build_catalog(Config(recognition=index_rc, build=BuildConfig(workers=1)), enc, catalog, path)
    idx = CatalogIndex.load(path, expected_bundle_sha256=enc.sha256, search_k=IndexConfig().search_k,
                            require_features=True)
    modes = {"multi": rc}
    if args.single:
        modes = {"single": rc.model_copy(update={"multi_item": False}), **modes}
    report = {"bundle": enc.manifest.name, "catalog_items": idx.size, "frames": len(frames), "settings": args.set,
              "modes": {}}
    for name, mode_rc in modes.items():
        lookup = Lookup(enc, idx, mode_rc, top_k=5)
        answers = []
        for f in frames:
            rgb = read_image(root / f["path"], 16_000_000)
            t = time.perf_counter()
            r = lookup.lookup_rgb(rgb)
            answers.append({"matches": [m.to_json() for m in r.matches], "ms": (time.perf_counter() - t) * 1e3})
        report["modes"][name] = rate(answers, frames)
        for key, row in report["modes"][name].items():
            print(f"{name:6s} {key:12s} {json.dumps(row)}", flush=True)
    tag = "".join(f"_{kv.replace('=', '')}" for kv in args.set)
    write_json(REPO / "benchmarks" / "results" / f"multi_item_{enc.manifest.name}{tag}.json", report)
    return 0
