"""Camera-view benchmark, through the device CLI exactly as a user runs it.

    python -m benchmarks quality [--bundle edge_retrieval/bundles/efficientnet-lite0] [--out NAME]
    python -m benchmarks quality --table          # converter combinations → benchmarks/results/combos.{json,md}

Catalog: crops of the real photos that ship with scikit-image / scikit-learn / matplotlib (benchmarks.views:
66 queried items whose crops overlap ≤ 15 %, plus 220 distractor crops that are indexed but never queried).
Queries: 4 simulated camera views per queried item, the view kinds cycling over edge_retrieval.app.demo.VIEW_KINDS (24
queries per kind). ``index build`` + one ``query --json --top-k 10`` call for all queries, with Annoy's
search_k raised so the numbers measure the descriptor, not the approximate search. Fixed seeds throughout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks.views import (
    CACHE,
    REPO,
    RESULTS,
    build_bundle,
    bundle_size_bytes,
    camera_view_set,
    instance_metrics,
    rank_of,
    run_module,
    write_json,
)
from edge_retrieval.core.config import OPEN_BUNDLE

TOP_K = 10
# PCA/calibration images of the built rows: links to the training-pool packages' images (edge_retrieval/convert/images.py);
# never in the catalog, and never a held-back package's
TRAINING_POOL = CACHE / "training-pool"
# Near-exact search and global descriptors only, spelled out (the config's defaults enable multi-view enrolment,
# adaptation and verification, which this table must not mix into the descriptor comparison).
NEAR_EXACT_CONFIG = ("index:\n  search_k: 100000\nrecognition:\n  enrol_views: []\n  features: false\n"
                     "  verify: false\n  adapt: false\n  decision: null\n")


def run_camera_views(bundle: Path, name: str, *, views_per_item: int = 4, seed: int = 0) -> dict:
    """Index the catalog with ``bundle`` and query every camera view; returns the metrics dict."""
    data = camera_view_set(views_per_item=views_per_item, seed=seed)
    work = CACHE / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "config.yaml"
    config.write_text(NEAR_EXACT_CONFIG)
    index = work / "index"
    run_module(["edge_retrieval", "index", "build", "--catalog", str(data.catalog), "--bundle", str(bundle),
                "--out", str(index), "--config", str(config)], log=work / "index_build.log")
    paths = [str(data.root / q["path"]) for q in data.queries]
    out = run_module(["edge_retrieval", "query", *paths, "--index", str(index), "--bundle", str(bundle),
                      "--top-k", str(TOP_K), "--json", "--config", str(config)])
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    by_path = {line["query"]: line for line in lines}
    if len(by_path) != len(paths):
        raise RuntimeError(f"expected {len(paths)} answers from `device query`, got {len(by_path)}")
    ranks, per_query, timings = [], [], {}
    for q, path in zip(data.queries, paths):
        ans = by_path[path]
        if "error" in ans:
            raise RuntimeError(f"query {path} failed: {ans['error']}")
        ids = [r["id"] for r in ans["results"]]
        rank = rank_of(ids, q["item"])
        ranks.append(rank)
        per_query.append({"item": q["item"], "kind": q["kind"], "rank": rank, "top1": ids[0] if ids else None,
                          "top1_score": round(ans["results"][0]["score"], 4) if ids else None})
        for k, v in ans["timings_ms"].items():
            timings.setdefault(k, []).append(v)
    kinds = list(dict.fromkeys(q["kind"] for q in data.queries))
    per_kind = {}
    for kind in kinds:
        kr = [r for r, q in zip(ranks, data.queries) if q["kind"] == kind]
        m = instance_metrics(kr, TOP_K)
        per_kind[kind] = {"recall_at_1": m["recall_at_1"], "recall_at_5": m["recall_at_5"], "queries": m["queries"]}
    # A miss whose top-1 is another crop of the same photo is a "hard negative" confusion; anything else is a
    # confusion with unrelated content.
    misses = [p for p in per_query if p["rank"] != 1]
    same_photo = sum(1 for p in misses if p["top1"] and _photo(p["top1"]) == _photo(p["item"]))
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {
        "bundle": str(bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle),
        "bundle_sha256": manifest["sha256"], "bundle_source": manifest.get("source", {}),
        "quantization": manifest.get("quantization"), "output_dim": manifest.get("output_dim"),
        "size_bytes": bundle_size_bytes(bundle),
        "dataset": data.info, "top_k": TOP_K, "search_k": 100000,
        **instance_metrics(ranks, TOP_K),
        "recall_at_1_per_kind": {k: v["recall_at_1"] for k, v in per_kind.items()},
        "per_kind": per_kind,
        "recall_at_1_per_photo": _per_photo(per_query),
        "misses": len(misses), "misses_top1_same_photo": same_photo,
        "latency_ms": {k: {"median": round(statistics.median(v), 2),
                           "p90": round(float(np.percentile(v, 90)), 2)} for k, v in timings.items()},
        "per_query": per_query,
    }


def _per_photo(per_query: list[dict]) -> dict[str, float]:
    photos = sorted({_photo(p["item"]) for p in per_query})
    return {ph: round(float(np.mean([p["rank"] == 1 for p in per_query if _photo(p["item"]) == ph])), 3)
            for ph in photos}


def _photo(item_id: str) -> str:
    return item_id.split("/", 1)[-1].rsplit("_", 1)[0]


def _print_run(name: str, r: dict) -> None:
    lat = r["latency_ms"]
    print(f"{name}: recall@1 {r['recall_at_1']:.3f}  recall@5 {r['recall_at_5']:.3f}  mAP@{TOP_K} "
          f"{r[f'map_at_{TOP_K}']:.3f}  ({r['queries']} queries, {r['dataset']['queried_items']} items + "
          f"{r['dataset']['distractor_items']} distractors)  encode {lat['encode']['median']:.1f} ms median")
    print("  recall@1 per view kind: " + ", ".join(f"{k} {v:.2f}" for k, v in r["recall_at_1_per_kind"].items()))
    worst = sorted(r["recall_at_1_per_photo"].items(), key=lambda kv: kv[1])[:6]
    print("  hardest source photos (recall@1): " + ", ".join(f"{k} {v:.2f}" for k, v in worst))
    print(f"  misses: {r['misses']}, of which top-1 was another crop of the same photo: {r['misses_top1_same_photo']}")


# ---------------------------------------------------------------- the combination table
EFFNET = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--input-size", "224",
          "--train-images", str(TRAINING_POOL)]
# One factor at a time from the baseline (GeM, PCA 128, no whitening, int8: the first default bundle), plus the
# shipped default. (row name, what changed, converter arguments or None for the shipped default bundle).
BASELINE = "gem-pca128-int8"
COMBOS: list[tuple[str, str, list[str] | None]] = [
    (BASELINE, "baseline: GeM p=3, PCA 128 (4 views/photo), int8", EFFNET + ["--pooling", "gem", "--pca", "128",
                                                                        "--quantize", "int8"]),
    ("default", "shipped efficientnet-lite0: GeM, PCA 256 + whitening (8 views/photo), int8", None),
    ("mac-pca128-int8", "pooling MAC", EFFNET + ["--pooling", "mac", "--pca", "128", "--quantize", "int8"]),
    ("avg-pca128-int8", "pooling average", EFFNET + ["--pooling", "avg", "--pca", "128", "--quantize", "int8"]),
    ("gem-nopca-int8", "no PCA (1280-d)", EFFNET + ["--pooling", "gem", "--quantize", "int8"]),
    ("gem-pca64-int8", "PCA 64", EFFNET + ["--pooling", "gem", "--pca", "64", "--quantize", "int8"]),
    # 58 training photos × 4 views = 232 descriptors < 257 needed for a 256-d PCA: 5 views per photo here.
    ("gem-pca256-int8", "PCA 256 (5 views/photo)", EFFNET + ["--pooling", "gem", "--pca", "256",
                                                              "--views-per-image", "5", "--quantize", "int8"]),
    ("gem-pca128w-int8", "PCA 128 + whitening", EFFNET + ["--pooling", "gem", "--pca", "128", "--whiten",
                                                          "--quantize", "int8"]),
    ("gem-pca128-float32", "float32", EFFNET + ["--pooling", "gem", "--pca", "128", "--quantize", "float32"]),
    ("gem-pca128-dynamic", "dynamic-range quantization", EFFNET + ["--pooling", "gem", "--pca", "128",
                                                                  "--quantize", "dynamic"]),
    ("ae64-c128-int8", "conv autoencoder 64 px, code 128, trained on the catalog", None),  # args need the catalog
    # VLAD was measured where /usr/share/backgrounds held only gnome-backgrounds + ukui-wallpapers (28 photos):
    # 28 × 4 views < 129 descriptors for PCA 128, so 5 views; the GeM control is trained on the same set.
    ("gem-pca128-int8-gu", "control: GeM p=3, PCA 128, on gnome+ukui wallpapers only (28 photos × 5 views), int8",
     EFFNET + ["--pooling", "gem", "--pca", "128", "--views-per-image", "5", "--quantize", "int8"]),
    ("vlad-k32-pca128-int8", "pooling VLAD K=32 (local PCA 128) on the same 28 × 5 views, PCA 128, int8",
     EFFNET + ["--pooling", "vlad", "--clusters", "32", "--pca", "128", "--views-per-image", "5",
               "--quantize", "int8"]),
]


def _ae_args(catalog: Path) -> list[str]:
    return ["--backbone", "autoencoder", "--input-size", "64", "--code-size", "128", "--epochs", "20",
            "--train-images", str(catalog), "--quantize", "int8"]


def _ranks(row: dict) -> list:
    """Per-query ranks of a fresh row (per_query) or of one read back from combos.json (ranks)."""
    return row["ranks"] if "ranks" in row else [p["rank"] for p in row["per_query"]]


def run_table(*, force_build: bool = False, only: set[str] | None = None) -> int:
    """Run the combinations (or only the named ones, keeping the other rows of combos.json) → combos.{json,md}."""
    data = camera_view_set()
    bundles_dir = CACHE / "bundles"
    rows = []
    if only:
        unknown = only - {c[0] for c in COMBOS}
        if unknown:
            print(f"error: unknown rows {', '.join(sorted(unknown))}; allowed: {', '.join(c[0] for c in COMBOS)}",
                  file=sys.stderr)
            return 2
        rows = [r for r in json.loads((RESULTS / "combos.json").read_text())["rows"] if r["name"] not in only]
    for name, change, args in COMBOS:
        if only and name not in only:
            continue
        if name == "default":
            bundle = OPEN_BUNDLE
            if not (bundle / "manifest.json").is_file():
                print(f"skip {name}: {bundle} has no bundle")
                continue
        else:
            if name.startswith("ae"):
                args = _ae_args(data.catalog)
            else:
                from edge_retrieval.convert.images import link_training_pool
                try:
                    link_training_pool(TRAINING_POOL)
                except FileNotFoundError as e:
                    print(f"skip {name}: {e}")
                    continue
            bundle = build_bundle(bundles_dir / name, args, force=force_build)
        r = run_camera_views(bundle, name)
        _print_run(name, r)
        rows.append({"name": name, "change": change, "converter_args": args, **r})
    if not rows:
        print("no combination could be run")
        return 1
    order = [c[0] for c in COMBOS]
    rows.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    out = {"dataset": data.info, "top_k": TOP_K,
           "rows": [{k: v for k, v in row.items() if k != "per_query"} | {"ranks": _ranks(row)} for row in rows]}
    write_json(RESULTS / "combos.json", out)
    (RESULTS / "combos.md").write_text(combos_markdown(rows, data.info))
    print(f"wrote {RESULTS / 'combos.json'} and {RESULTS / 'combos.md'}")
    return 0


def _paired(a: list, b: list) -> tuple[int, int]:
    """(queries top-1 correct in b but not a, in a but not b)."""
    wa = [r == 1 for r in a]
    wb = [r == 1 for r in b]
    return sum(y and not x for x, y in zip(wa, wb)), sum(x and not y for x, y in zip(wa, wb))


def combos_markdown(rows: list[dict], info: dict) -> str:
    """The table, plus the per-row comparison with the default written out from the numbers."""
    base = next((r for r in rows if r["name"] == BASELINE), rows[0])
    lines = [
        "# Converter combinations on the camera-view benchmark",
        "",
        f"Catalog: {info['queried_items']} queried crops + {info['distractor_items']} distractor crops of "
        f"{len(info['photos'])} real photos shipped in scikit-image / scikit-learn / matplotlib; "
        f"{info['queries']} simulated camera views ({', '.join(f'{k} {v}' for k, v in info['queries_per_kind'].items())}). "
        f"EfficientNet-Lite0 rows: PCA / calibration on the training pool (gnome-backgrounds + ukui-wallpapers, "
        f"`python -m edge_retrieval.convert training-pool`; rows measured before it used /usr/share/backgrounds), disjoint from "
        f"the catalog. Each row changes one factor from the baseline (GeM p=3, PCA 128, no whitening, int8 — the "
        f"first default bundle); `default` is the shipped bundle chosen from this table. "
        f"Through `python -m edge_retrieval index build` / `query --json --top-k {TOP_K}` with Annoy search_k raised to "
        f"near-exact, and recognition pinned to global descriptors (no multi-view enrolment, adaptation or "
        f"verification), so the rows compare global descriptors. Encode = median per-query `timings_ms.encode` (ai-edge-litert, 2 threads, on a shared "
        f"2-core x86 machine). Generated by `python -m benchmarks quality --table`.",
        "",
        "| bundle | change | dim | recall@1 | recall@5 | mAP@10 | Δ recall@1 vs baseline (+won / −lost) | size | encode ms |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    base_ranks = _ranks(base)
    for r in rows:
        ranks = _ranks(r)
        won, lost = _paired(base_ranks, ranks)
        delta = "—" if r is base else f"{r['recall_at_1'] - base['recall_at_1']:+.3f} (+{won} / −{lost})"
        lines.append(f"| {r['name']} | {r['change']} | {r['output_dim']} | {r['recall_at_1']:.3f} | "
                     f"{r['recall_at_5']:.3f} | {r[f'map_at_{TOP_K}']:.3f} | {delta} | "
                     f"{r['size_bytes'] / 1e6:.2f} MB | {r['latency_ms']['encode']['median']:.1f} |")
    kinds = list(base["recall_at_1_per_kind"])
    lines += ["", "Recall@1 per view kind:", "",
              "| bundle | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['recall_at_1_per_kind'][k]:.2f}" for k in kinds) + " |")
    lines += ["", "## What helps, what hurts (written from the numbers above)", ""]
    n = base["queries"]
    lines.append(f"With {n} queries a recall@1 difference below about 0.03 (≈ {int(0.03 * n)} queries) is within "
                 f"the noise of this benchmark; the (+won / −lost) counts are paired over the same queries.")
    lines.append("")
    for r in rows:
        if r is base:
            continue
        d = r["recall_at_1"] - base["recall_at_1"]
        verdict = "helps" if d >= 0.03 else "hurts" if d <= -0.03 else "makes no clear difference"
        lines.append(f"- **{r['change']}** {verdict}: recall@1 {r['recall_at_1']:.3f} vs {base['recall_at_1']:.3f}, "
                     f"mAP@10 {r[f'map_at_{TOP_K}']:.3f} vs {base[f'map_at_{TOP_K}']:.3f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks quality``: one bundle on the camera-view benchmark, or the combination table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=OPEN_BUNDLE, help="bundle to benchmark (default edge_retrieval/bundles/efficientnet-lite0)")
    p.add_argument("--out", default=None, help="results name: benchmarks/results/quality_<NAME>.json "
                   "(default: the bundle folder name)")
    p.add_argument("--table", action="store_true", help="build the converter combinations (cached under "
                   "var/bench/bundles) and write benchmarks/results/combos.{json,md}")
    p.add_argument("--rebuild", action="store_true", help="--table: rebuild cached bundles")
    p.add_argument("--only", default=None, metavar="ROW[,ROW]", help="--table: run only these rows and keep the "
                   "others as they are in benchmarks/results/combos.json")
    args = p.parse_args(argv)
    if args.table:
        return run_table(force_build=args.rebuild, only=set(args.only.split(",")) if args.only else None)
    bundle = args.bundle.resolve()
    if not (bundle / "manifest.json").is_file():
        print(f"error: {args.bundle}: no bundle (manifest.json) there", file=sys.stderr)
        return 2
    name = args.out or bundle.name
    r = run_camera_views(bundle, name)
    _print_run(name, r)
    path = RESULTS / f"quality_{name}.json"
    write_json(path, r)
    print(f"wrote {path}")
    return 0
