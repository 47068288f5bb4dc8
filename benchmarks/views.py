"""Shared pieces of the benchmarks: the camera-view data set (catalog crops of the shipped photos, distractors,
simulated camera views), retrieval metrics, and running the device CLI / the converter as a user would.

The data set is generated deterministically into a cache folder (git-ignored ``var/bench/...``); only the
generator is committed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "var" / "bench"

# Bump when the generator changes, so a stale cache is regenerated rather than silently reused.
# 2: + one view per queried item that leaves the print's plane (VIEWPOINT_KINDS); 3: each item in a folder of its
# own (catalog/q/<photo>_NN/<photo>_NN.jpg), since a folder of files is now one item of several photos
DATASET_VERSION = 3


# ---------------------------------------------------------------- catalog crops with controlled overlap
def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area / the smaller box's area (boxes are y0, x0, h, w). 1.0 = one contains the other."""
    iy = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iy * ix / min(a[2] * a[3], b[2] * b[3])


def _random_box(h: int, w: int, rng: np.random.Generator, lo: float, hi: float) -> tuple[int, int, int, int]:
    # Same sampling as edge_retrieval.app.demo.photo_crops (side fraction of the photo, aspect jitter), but the box is kept
    # so that overlap between items can be controlled.
    f = rng.uniform(lo, hi)
    ch, cw = int(h * f), min(w, int(w * f * rng.uniform(0.8, 1.25)))
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw


@dataclass(frozen=True)
class CropPlan:
    queried_per_photo: int = 3       # items that get camera-view queries
    max_queried_overlap: float = 0.15  # between two queried crops of one photo
    distractors: int = 220           # in the index, never queried
    max_distractor_overlap: float = 0.30  # between a distractor and any queried crop of the same photo
    size_px: int = 320               # longest side of a catalog image (as photo_crops)
    attempts: int = 4000             # candidate boxes per photo


def plan_crops(photos: dict[str, np.ndarray], plan: CropPlan, seed: int) -> tuple[dict, dict]:
    """(queried, distractors): id → (photo name, box). Queried crops of one photo overlap ≤ 15 % (of the smaller
    crop) so a view of one is not a view of another; distractors overlap every queried crop by ≤ 30 %, so they
    are hard negatives (same photo, same texture and colours) but never a near-duplicate of a queried item."""
    rng = np.random.default_rng(seed)
    queried: dict[str, tuple[str, tuple]] = {}
    candidates: dict[str, list[tuple]] = {}
    for name in sorted(photos):
        h, w = photos[name].shape[:2]
        mine: list[tuple] = []
        for _ in range(plan.attempts):
            if len(mine) >= plan.queried_per_photo:
                break
            box = _random_box(h, w, rng, 0.35, 0.6)
            if all(_overlap(box, b) <= plan.max_queried_overlap for b in mine):
                mine.append(box)
        for i, box in enumerate(mine):
            queried[f"q/{name}_{i:02d}"] = (name, box)
        ok = []
        for _ in range(plan.attempts):
            box = _random_box(h, w, rng, 0.25, 0.6)
            if all(_overlap(box, b) <= plan.max_distractor_overlap for b in mine):
                ok.append(box)
        candidates[name] = ok
    # Distractors round-robin over the photos so every photo contributes about equally.
    distractors: dict[str, tuple[str, tuple]] = {}
    names = [n for n in sorted(candidates) if candidates[n]]
    taken = {n: 0 for n in names}
    while len(distractors) < plan.distractors and names:
        for n in list(names):
            if len(distractors) >= plan.distractors:
                break
            if taken[n] >= len(candidates[n]):
                names.remove(n)
                continue
            distractors[f"d/{n}_{taken[n]:02d}"] = (n, candidates[n][taken[n]])
            taken[n] += 1
    return queried, distractors


def _cut(img: np.ndarray, box: tuple, size_px: int) -> np.ndarray:
    import cv2
    y0, x0, ch, cw = box
    crop = img[y0:y0 + ch, x0:x0 + cw]
    scale = size_px / max(crop.shape[:2])
    return cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def _write_views(rgb: np.ndarray, item: str, root: Path, n: int, rng: np.random.Generator, j: int,
                 queries: list[dict], kinds: tuple[str, ...] | None = None) -> int:
    """Write ``n`` camera views of one item under ``root/queries`` (kinds cycle over ``kinds``, VIEW_KINDS by
    default, from the running count ``j``), append their ground truth to ``queries``; returns the new count."""
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.synthetic_views import VIEW_KINDS, camera_view
    kinds = kinds or VIEW_KINDS
    for _ in range(n):
        kind = kinds[j % len(kinds)]
        j += 1
        path = root / "queries" / f"{item.replace('/', '_')}__{kind}.jpg"
        path.write_bytes(encode_jpeg(camera_view(rgb, kind, rng), 90))
        queries.append({"path": str(path.relative_to(root)), "item": item, "kind": kind})
    return j


@dataclass
class CameraViewSet:
    root: Path
    catalog: Path
    queries: list[dict]     # {"path", "item", "kind"}
    n_items: int            # catalog items in the index (queried + distractors)
    n_queried: int
    info: dict


def camera_view_set(root: Path | None = None, *, views_per_item: int = 4, seed: int = 0,
                    plan: CropPlan = CropPlan()) -> CameraViewSet:
    """Generate (or reuse) the camera-view benchmark data: catalog/{q,d}/*.jpg and queries/*.jpg, plus
    ``dataset.json`` with the ground truth. View kinds cycle over VIEW_KINDS across all queries, so each kind
    gets about the same number of queries and each item ``views_per_item`` different kinds."""
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import shipped_photos
    from edge_retrieval.imaging.synthetic_views import VIEW_KINDS, VIEWPOINT_KINDS
    root = Path(root or CACHE / "camera_views")
    meta = root / "dataset.json"
    params = {"version": DATASET_VERSION, "views_per_item": views_per_item, "seed": seed, "plan": plan.__dict__}
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved["params"] == params:
            return CameraViewSet(root, root / "catalog", saved["queries"], saved["n_items"], saved["n_queried"],
                                 saved["info"])
    shutil.rmtree(root, ignore_errors=True)
    photos = shipped_photos()
    queried, distractors = plan_crops(photos, plan, seed)
    (root / "catalog").mkdir(parents=True)
    (root / "queries").mkdir()
    for item, (name, box) in {**queried, **distractors}.items():
        path = root / "catalog" / item / f"{item.rsplit('/', 1)[-1]}.jpg"  # the item folder's one photo: id = item
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(_cut(photos[name], box, plan.size_px), 92))
    rng = np.random.default_rng(seed + 1)
    queries, j = [], 0
    for item, (name, box) in sorted(queried.items()):
        j = _write_views(_cut(photos[name], box, plan.size_px), item, root, views_per_item, rng, j, queries)
    # one more view per item out of the print's plane, from its own RNG so the views above stay as they were
    rng3d, j3d = np.random.default_rng(seed + 2), 0
    for item, (name, box) in sorted(queried.items()):
        j3d = _write_views(_cut(photos[name], box, plan.size_px), item, root, 1, rng3d, j3d, queries, VIEWPOINT_KINDS)
    info = {"photos": sorted(photos), "queried_items": len(queried), "distractor_items": len(distractors),
            "queries": len(queries),
            "queries_per_kind": {k: sum(q["kind"] == k for q in queries) for k in VIEW_KINDS + VIEWPOINT_KINDS},
            "crop_rule": (f"queried crops of one photo overlap <= {plan.max_queried_overlap:.0%} of the smaller crop; "
                          f"distractors overlap every queried crop of their photo <= {plan.max_distractor_overlap:.0%}"),
            "view_size_px": [480, 640]}
    meta.write_text(json.dumps({"params": params, "queries": queries, "n_items": len(queried) + len(distractors),
                                "n_queried": len(queried), "info": info}, indent=1) + "\n")
    return CameraViewSet(root, root / "catalog", queries, len(queried) + len(distractors), len(queried), info)


def catalog_view_set(folder: Path, *, views_per_item: int = 4, seed: int = 0) -> CameraViewSet:
    """The same kind of benchmark from a user's own catalog folder (``python -m benchmarks calibrate --catalog DIR``):
    the folder is indexed as it is and every image gets ``views_per_item`` seeded camera views (kinds cycle over
    VIEW_KINDS), generated into the cache. Item ids follow ``index build`` (relative path without suffix)."""
    from edge_retrieval.catalog.build import scan_folder
    from edge_retrieval.imaging.codec import DEFAULT_MAX_PIXELS, read_image
    folder = Path(folder).resolve()
    root = CACHE / "catalog_views" / folder.name
    shutil.rmtree(root, ignore_errors=True)
    (root / "queries").mkdir(parents=True)
    rng = np.random.default_rng(seed + 1)
    queries, j = [], 0
    paths = scan_folder(folder)
    for path in paths:
        item = path.relative_to(folder).with_suffix("").as_posix()
        j = _write_views(read_image(path, DEFAULT_MAX_PIXELS), item, root, views_per_item, rng, j, queries)
    info = {"catalog": str(folder), "queries": len(queries), "views_per_item": views_per_item}
    return CameraViewSet(root, folder, queries, len(paths), len(paths), info)


# ---------------------------------------------------------------- metrics
def rank_of(results: list[str], truth: str) -> int | None:
    """1-based rank of ``truth`` in the returned ids, None when it is not among them."""
    return results.index(truth) + 1 if truth in results else None


def instance_metrics(ranks: list[int | None], top_k: int) -> dict:
    """recall@1, recall@5 and mAP@k for one relevant item per query (AP = 1/rank within top k, else 0)."""
    r = np.array([x if x is not None else 10 ** 9 for x in ranks])
    return {"recall_at_1": round(float(np.mean(r <= 1)), 4), "recall_at_5": round(float(np.mean(r <= 5)), 4),
            f"map_at_{top_k}": round(float(np.mean(np.where(r <= top_k, 1.0 / r, 0.0))), 4), "queries": len(ranks)}


# ---------------------------------------------------------------- running the tools as a user would
def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_module(args: list[str], *, log: Path | None = None) -> str:
    """``python -m <args>`` in the repo; returns stdout, raises with the tail of stderr on failure."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=python_env(), capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def build_bundle(out: Path, converter_args: list[str], *, force: bool = False) -> Path:
    """Build a bundle with the converter CLI unless ``out`` already holds one (bundles are cached)."""
    if (out / "manifest.json").is_file() and not force:
        return out
    print(f"  building {out.name}: python -m edge_retrieval.convert build {' '.join(converter_args)}", flush=True)
    run_module(["edge_retrieval.convert", "build", *converter_args, "--out", str(out)], log=out.parent / f"{out.name}.log")
    return out


def bundle_size_bytes(bundle: Path) -> int:
    man = json.loads((bundle / "manifest.json").read_text())
    return (bundle / man.get("model_file", "encoder.tflite")).stat().st_size


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
