"""The decision's background set (``python -m benchmarks background``): descriptors of camera views of the
training pool's photos, which a lookup compares its query with to say how much the query resembles *anything*
(edge_retrieval/search/decision.py, feature ``score_bg``; SSCD's score normalisation).

Sources: the photos that ship in pip packages (scikit-image, scikit-learn, matplotlib: the benchmark catalog's
photos) and the wallpapers of Debian's gnome-backgrounds and ukui-wallpapers (the open set's). Each source gives
``VIEWS_PER_SOURCE`` random crops (a quarter to the whole photo), each seen as one simulated camera view of a
cycling kind. The vectors are the bundle's raw descriptors (not projected: a lookup projects them with the
generation's catalog adaptation), float16.

Writes ``var/bench/background/<bundle>/`` (vectors.npy + sources.json: the source of each row, for the
benchmark's held-out split, which must not compare a view with a background built from its own photo) and, with
``--write-bundle``, the bundle's ``background.npy`` and its manifest entry.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.views import CACHE
from edge_retrieval.core.config import DEFAULT_BUNDLE

VIEWS_PER_SOURCE = 20
SEED = 11
VERSION = 1


def sources() -> list[tuple[str, np.ndarray]]:
    """(source group, RGB) of every training-pool photo: 'photo:<name>' for the pip packages' photos,
    'package:<Debian package>/<file>' for the wallpapers (the groups benchmarks/recognition.py splits by)."""
    from edge_retrieval.convert.images import MAX_PIXELS, TRAINING_PACKAGES, training_pool_files
    from edge_retrieval.core.errors import ImageError
    from edge_retrieval.imaging.codec import read_image
    from edge_retrieval.imaging.shipped_photos import shipped_photos
    out = [(f"photo:{name}", rgb) for name, rgb in sorted(shipped_photos().items())]
    for pkg in TRAINING_PACKAGES:
        for path in training_pool_files((pkg,)):
            try:
                out.append((f"package:{pkg}/{path.name}", read_image(path, MAX_PIXELS)))
            except ImageError:
                continue
    return out


def _views(rgb: np.ndarray, rng: np.random.Generator, n: int, start: int) -> list[np.ndarray]:
    import cv2

    from edge_retrieval.imaging.synthetic_views import VIEW_KINDS, VIEWPOINT_KINDS, camera_view
    kinds = VIEW_KINDS + VIEWPOINT_KINDS
    scale = 800 / max(rgb.shape[:2])
    img = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    h, w = img.shape[:2]
    out = []
    for j in range(n):
        f = rng.uniform(0.25, 1.0)
        ch, cw = max(32, int(h * f)), max(32, min(w, int(w * f * rng.uniform(0.8, 1.25))))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw])
        out.append(camera_view(crop, kinds[(start + j) % len(kinds)], rng))
    return out


def cache_dir(bundle: Path) -> Path:
    """Where the background of ``bundle`` is cached with its rows' sources."""
    return CACHE / "background" / Path(bundle).resolve().name


def build(bundle: Path = DEFAULT_BUNDLE, views_per_source: int = VIEWS_PER_SOURCE) -> tuple[np.ndarray, list[str]]:
    """(float16 [N, D] raw descriptors, source group of each row), cached per bundle."""
    from edge_retrieval.model.encoder import Encoder
    root = cache_dir(bundle)
    meta = root / "sources.json"
    params = {"version": VERSION, "views_per_source": views_per_source, "seed": SEED}
    if meta.is_file() and json.loads(meta.read_text()).get("params") == params:
        return np.load(root / "vectors.npy"), json.loads(meta.read_text())["sources"]
    rng = np.random.default_rng(SEED)
    enc = Encoder.from_bundle(bundle, num_threads=2)
    rows, names = [], []
    for i, (group, rgb) in enumerate(sources()):
        for view in _views(rgb, rng, views_per_source, i):
            rows.append(enc.embed(view))
            names.append(group)
    vectors = np.asarray(rows, dtype=np.float16)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "vectors.npy", vectors)
    meta.write_text(json.dumps({"params": params, "sources": names}, indent=0) + "\n")
    return vectors, names


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the background set of a bundle; with --write-bundle put it into the bundle."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks background", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--write-bundle", action="store_true", help="write background.npy and the manifest entry")
    args = ap.parse_args(argv)
    from edge_retrieval.convert.images import TRAINING_PACKAGES, training_pool_files
    if not training_pool_files():
        print(f"skipped: the training pool's wallpapers are missing (apt-get install {' '.join(TRAINING_PACKAGES)})")
        return 0
    vectors, names = build(args.bundle)
    groups = sorted(set(names))
    print(f"background: {len(vectors)} vectors x {vectors.shape[1]} (float16, {vectors.nbytes / 1e6:.2f} MB) of "
          f"{len(groups)} training-pool photos, {VIEWS_PER_SOURCE} camera views each")
    if args.write_bundle:
        from edge_retrieval.model.bundle import write_background
        entry = write_background(args.bundle, vectors, {
            "made_by": "python -m benchmarks background --write-bundle",
            "views_per_source": VIEWS_PER_SOURCE, "seed": SEED,
            "sources": {"pip": sorted(g[6:] for g in groups if g.startswith("photo:")),
                        "debian": sorted(g[8:] for g in groups if g.startswith("package:"))}})
        print(f"wrote {Path(args.bundle) / entry.file} ({entry.count} vectors, sha256 {entry.sha256[:12]}…)")
    return 0


def query_sims(paths: list[str], bundle: Path, index_dir: Path, cache: Path) -> np.ndarray:
    """Cosines [len(paths), N] of each query's whole-frame descriptor to the background set of ``bundle``, both
    in the space of the index at ``index_dir`` (projected by its catalog adaptation), decoded and encoded as a
    lookup does (``Lookup.decode``, ``Encoder.embed``); the descriptors are cached in ``cache``."""
    from edge_retrieval.core.config import RecognitionConfig
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    background, _ = build(bundle)
    enc = Encoder.from_bundle(bundle, num_threads=2)
    idx = CatalogIndex.load(index_dir, expected_bundle_sha256=None)
    if cache.is_file() and json.loads((cache.with_suffix(".json")).read_text()) == paths:
        raw = np.load(cache)
    else:
        look = Lookup(enc, idx, RecognitionConfig(verify=True, decision=None), top_k=1)
        raw = np.stack([enc.embed(look.decode(Path(p).read_bytes())[0]) for p in paths]).astype(np.float32)
        np.save(cache, raw)
        cache.with_suffix(".json").write_text(json.dumps(paths))
    bg = np.asarray(background, np.float32)
    if idx.projection is not None:
        raw, bg = idx.projection.apply(raw), idx.projection.apply(bg)
    return raw @ bg.T
