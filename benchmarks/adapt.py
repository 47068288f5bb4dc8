"""Catalog adaptation (learned whitening fitted at index build) on the camera-view benchmark, global descriptor
only: ``python -m benchmarks adapt [--bundles default DIR ...] [--dims 256 ...] [--build-1k]``.

For each bundle it builds the benchmark catalog (multi-view enrolment, no local features) without and with
``recognition.adapt`` through the device's own ``build_index`` and queries every camera view with the device's
``Lookup``; prints recall@1 overall / table views / per kind, the build time and the index size; writes
benchmarks/results/adapt.json. ``--build-1k`` instead times ``index build`` (shipped defaults) of a synthetic 1,000-item
catalog (crops of the shipped photos) with and without adaptation: benchmarks/results/adapt_build_1k.json.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.views import CACHE, RESULTS, camera_view_set, write_json
from edge_retrieval.core.config import DEFAULT_BUNDLE, RecognitionConfig


def _build(catalog: Path, bundle: Path, out: Path, rc: RecognitionConfig) -> tuple[float, int]:
    """(seconds, index bytes) of a device build of ``catalog`` into ``out``."""
    from edge_retrieval.catalog.build import ItemMaker, build_index
    from edge_retrieval.model.encoder import Encoder
    shutil.rmtree(out, ignore_errors=True)
    with Encoder.from_bundle(bundle, num_threads=2) as enc:
        t0 = time.perf_counter()
        build_index(catalog, ItemMaker(enc, rc, 160), out, n_trees=10, progress=False)
        secs = time.perf_counter() - t0
    return secs, sum(p.stat().st_size for p in (out / "current").resolve().iterdir())


def recall(bundle: Path, index: Path, data, rc: RecognitionConfig) -> dict:
    """recall@1 of every benchmark view through the device Lookup (global only)."""
    from edge_retrieval.imaging.codec import read_image
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    with Encoder.from_bundle(bundle, num_threads=2) as enc, \
            CatalogIndex.load(index, expected_bundle_sha256=enc.sha256, search_k=100000) as idx:
        lookup = Lookup(enc, idx, rc, top_k=1)
        ok = [(lookup.lookup_rgb(read_image(data.root / q["path"])).results[0].id == q["item"], q["kind"])
              for q in data.queries]
    kinds = list(dict.fromkeys(k for _, k in ok))
    return {"recall_at_1": round(float(np.mean([o for o, _ in ok])), 4),
            "table_views": round(float(np.mean([o for o, k in ok if k.startswith("table")])), 4),
            "per_kind": {k: round(float(np.mean([o for o, kk in ok if kk == k])), 3) for k in kinds}}


def build_1k(bundle: Path) -> dict:
    """Build seconds of a 1,000-item catalog (crops of the shipped photos) with and without adaptation."""
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
    folder = CACHE / "adapt" / "catalog_1k"
    if not folder.is_dir():
        photos = shipped_photos()
        crops = photo_crops(photos, per_photo=-(-1000 // len(photos)), seed=3)
        folder.mkdir(parents=True)
        for name in sorted(crops)[:1000]:
            (folder / f"{name}.jpg").write_bytes(encode_jpeg(crops[name], 90))
    out = {}
    for adapt in (False, True):
        rc = RecognitionConfig(adapt=adapt)  # the shipped defaults otherwise (multi-view + ORB features)
        secs, size = _build(folder, bundle, CACHE / "adapt" / "index_1k", rc)
        out["adapt" if adapt else "no_adapt"] = {"seconds": round(secs, 1), "index_bytes": size}
        print(f"  1,000 items, adapt={adapt}: {secs:.1f} s, index {size / 1e6:.1f} MB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print and write benchmarks/results/adapt.json."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks adapt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", default=[str(DEFAULT_BUNDLE)])
    ap.add_argument("--dims", nargs="+", type=int, default=[256])
    ap.add_argument("--shrinkage", nargs="+", type=float, default=[RecognitionConfig().adapt_shrinkage])
    ap.add_argument("--build-1k", action="store_true", help="only time the 1,000-item build (adapt_build_1k.json)")
    ap.add_argument("--out", default=str(RESULTS / "adapt.json"))
    args = ap.parse_args(argv)
    if args.build_1k:  # timing only
        write_json(RESULTS / "adapt_build_1k.json", build_1k(Path(args.bundles[0])))
        return 0
    data = camera_view_set()
    report: dict = {"dataset": data.info, "rows": []}
    base = RecognitionConfig(features=False, verify=False)
    for bundle in map(Path, args.bundles):
        index = CACHE / "adapt" / bundle.name
        settings = [dict(adapt=False)] + [dict(adapt=True, adapt_dim=d, adapt_shrinkage=s)
                                          for d in args.dims for s in args.shrinkage]
        for extra in settings:
            rc = base.model_copy(update=extra)
            secs, size = _build(data.catalog, bundle, index, rc)
            row = {"bundle": bundle.name, **extra, "build_s": round(secs, 1), "index_bytes": size,
                   **recall(bundle, index, data, rc)}
            report["rows"].append(row)
            print(f"{bundle.name} {extra}: recall@1 {row['recall_at_1']:.3f} (table {row['table_views']:.3f}); "
                  f"build {secs:.1f} s, index {size / 1e6:.2f} MB\n  {row['per_kind']}", flush=True)
    write_json(Path(args.out), report)
    return 0
