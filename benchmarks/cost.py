"""What a lookup costs against bare inference of the same model, interleaved in one run:
``python -m benchmarks cost [--bundle DIR] [--pairs N]``.

On the camera-view benchmark's catalog (286 items, built with the default recognition settings), each round
times, on the same camera view: bare ``invoke()`` of the prepared tensor, the camera path (an RGB frame → global
lookup: preprocess → invoke → Annoy, no verification), an upload (JPEG bytes → decode → global lookup) and the
default verified lookup of the frame (multi-view index, adaptation, ORB verification, decision, the search for
more items: a one-item frame, where it finds nothing more), the same with ``multi_item: false`` (one item named),
and both on a frame with four catalog prints (``python -m benchmarks multi_item``'s frames; the catalog is the
same). Medians (and the 90th percentile of the verified lookups: the search's cost lies in the frames it does not
end at once) and their ratios to the bare invoke of the same rounds; how many one-item rounds named a second item
and how many of the four prints were named; the process's peak RSS while looking up (reset after the build).
Writes benchmarks/results/cost_NAME.json.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.views import CACHE, RESULTS, camera_view_set, write_json
from edge_retrieval.core.config import DEFAULT_BUNDLE


def _memory_mb() -> dict:
    """Peak RSS since the reset, RSS now and its anonymous part, from /proc/self/status."""
    st = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {k: int(st[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon")}
    return {"peak_rss_mb": round(kb["VmHWM"] / 1024, 1), "rss_mb": round(kb["VmRSS"] / 1024, 1),
            "anon_mb": round(kb["RssAnon"] / 1024, 1)}


def four_item_frames() -> list:
    """The frames of ``python -m benchmarks multi_item`` with four catalog prints of this catalog (decoded)."""
    from benchmarks.multi_item import make_frames
    from edge_retrieval.imaging.codec import read_image
    root, frames, _ = make_frames(150)
    return [read_image(root / f["path"], 16_000_000) for f in frames if f["prints"] == 4 and not f["unknown"]][:20]


def main(argv: list[str] | None = None) -> int:
    """Build the benchmark catalog with ``--bundle``, time the four paths interleaved, print and write ratios."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks cost", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--pairs", type=int, default=150, help="interleaved rounds")
    args = ap.parse_args(argv)
    from edge_retrieval.app import wiring
    from edge_retrieval.core.config import BuildConfig, Config, IndexConfig, RecognitionConfig
    from edge_retrieval.imaging.codec import decode_image
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    data = camera_view_set()
    rc = RecognitionConfig()
    enc = Encoder.from_bundle(args.bundle, num_threads=2)
    path = CACHE / "cost" / enc.manifest.name
    t0 = time.perf_counter()
    wiring.build_catalog(Config(recognition=rc, build=BuildConfig(workers=1)), enc, data.catalog, path)
    build_s = time.perf_counter() - t0
    idx = CatalogIndex.load(path, expected_bundle_sha256=enc.sha256, search_k=IndexConfig().search_k,
                            require_features=True)
    verified = Lookup(enc, idx, rc, top_k=5)
    single = Lookup(enc, idx, rc.model_copy(update={"multi_item": False}), top_k=5)
    camera = Lookup(enc, idx, rc.model_copy(update={"verify": False}), top_k=5)
    blobs = [(data.root / q["path"]).read_bytes() for q in data.queries]
    fours = four_item_frames()
    times: dict[str, list[float]] = {"invoke": [], "camera": [], "upload": [], "verified": [], "verified_single": [],
                                     "four_items": [], "four_items_single": []}
    named: dict[str, list[int]] = {"verified": [], "four_items": []}  # items a lookup named, per round
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM): what follows is a serving device
    for i in range(args.pairs + 5):
        blob = blobs[i % len(blobs)]
        frame = decode_image(blob)
        x = enc.preprocess(frame)
        # each lambda runs in this iteration (timed below), so binding the loop variables late is intended
        four = fours[i % len(fours)]
        for name, run in (("invoke", lambda: enc.invoke(x)), ("camera", lambda: camera.lookup_rgb(frame)),  # noqa: B023
                          ("upload", lambda: camera.lookup_bytes(blob)), ("verified", lambda: verified.lookup_rgb(frame)),  # noqa: B023
                          ("verified_single", lambda: single.lookup_rgb(frame)),  # noqa: B023
                          ("four_items", lambda: verified.lookup_rgb(four)),  # noqa: B023
                          ("four_items_single", lambda: single.lookup_rgb(four))):  # noqa: B023
            t = time.perf_counter()
            result = run()
            if i >= 5:
                times[name].append((time.perf_counter() - t) * 1e3)
                if name in named:
                    named[name].append(len(result.matches))
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    p90 = {k: round(float(np.percentile(times[k], 90)), 3) for k in ("verified", "verified_single", "four_items")}
    over = {k: round(v / med["invoke"], 3) for k, v in med.items() if k != "invoke"}
    out = {"bundle": enc.manifest.name, "runtime": enc.runtime, "rounds": args.pairs, "catalog_items": idx.size,
           "median_ms": med, "over_invoke": over, "p90_ms": p90,
           "one_item_rounds_naming_more": sum(n > 1 for n in named["verified"]),
           "four_items_named_mean": round(statistics.mean(named["four_items"]), 2),
           "build_s": round(build_s, 1), **_memory_mb()}
    print(f"{out['bundle']} ({out['runtime']}), {idx.size} items, {args.pairs} interleaved rounds; medians ms {med}")
    print(f"  ÷ bare invoke: {over}; index build {out['build_s']} s; while looking up: peak RSS "
          f"{out['peak_rss_mb']} MB, RSS {out['rss_mb']} MB of which anonymous {out['anon_mb']} MB")
    print(f"  one item in view, the search for more on: {med['verified']} ms = {over['verified']}x bare inference "
          f"(off: {over['verified_single']}x, so the search adds {over['verified'] - over['verified_single']:.2f}x; "
          f"p90 {p90['verified']} ms vs {p90['verified_single']} ms; {out['one_item_rounds_naming_more']} of "
          f"{args.pairs} rounds named a second item)")
    print(f"  four prints in view: {med['four_items']} ms = {over['four_items']}x bare inference, "
          f"{out['four_items_named_mean']} of 4 named on average (one named, search off: {over['four_items_single']}x)")
    write_json(RESULTS / f"cost_{out['bundle']}.json", out)
    return 0
