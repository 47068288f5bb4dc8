"""Annoy recall@10 and speed against exact numpy search, on real descriptors of the default bundle.

    python -m benchmarks annoy            (or: python -m benchmarks.annoy_recall [--sizes 10000 100000] [--queries 440])

Writes benchmarks/results/annoy.json and benchmarks/results/annoy_recall.png.

The descriptors are real: the default encoder's output for crops of the photos shipped in pip packages
(edge_retrieval.app.demo) and for simulated camera views of them. About 3k real descriptors are encoded once (cached
under var/bench/); larger indexes are filled up with small Gaussian perturbations of those real vectors,
renormalised (there is no 100k-image multi-view data set offline, ../shared/DATA.md). The queries are
held-out views: the same crops seen through a camera-view kind whose descriptor is NOT in the index.

This module also serves benchmarks/speed.py (``real_descriptors``, ``filled_index_vectors``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edge_retrieval.core.config import DEFAULT_BUNDLE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "var" / "bench"

GENERATOR_VERSION = 1
CROPS_PER_PHOTO = 20
POOL_VIEWS = ("closeup", "perspective", "rotate", "lighting", "table")   # + the crop itself
QUERY_VIEWS = ("zoom", "color_cast", "blur", "noise_jpeg", "occluded", "table_occluded")
VIEW_HW = (240, 320)  # the model sees 224 px; smaller simulated frames make the generator 4x faster

N_TREES = (10, 25, 50, 100)
SEARCH_KS = (-1, 1000, 2000, 5000, 10000, 20000)
TOP_K = 10
RECALL_TARGET = 0.95
TIME_RATIO_TARGET = 0.2  # Annoy at most 1/5 of exact search time
def _config_default() -> dict:
    from edge_retrieval.core.config import IndexConfig
    d = IndexConfig()
    return {"n_trees": d.n_trees, "search_k": d.search_k}


CONFIG_DEFAULT = _config_default()  # what edge_retrieval/core/config.py ships


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- real descriptors

def real_descriptors(encoder=None, *, cache_dir: Path = CACHE) -> dict[str, np.ndarray]:
    """Real descriptors of the default bundle, cached per bundle sha256.

    Returns ``pool`` (float32 N x D: each crop + its POOL_VIEWS camera views), ``pool_group`` (crop number
    of each pool row), ``queries`` (one held-out camera view per crop, a kind not in POOL_VIEWS) and
    ``query_group``."""
    from edge_retrieval.model.bundle import load_manifest
    sha = load_manifest(DEFAULT_BUNDLE, verify_sha=False).sha256
    path = cache_dir / f"real-descriptors-{sha[:12]}-v{GENERATOR_VERSION}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
    from edge_retrieval.imaging.synthetic_views import camera_view
    from edge_retrieval.model.encoder import Encoder
    own = encoder is None
    enc = encoder or Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=2)
    crops = photo_crops(shipped_photos(), CROPS_PER_PHOTO, seed=7)
    log(f"encoding real descriptors: {len(crops)} crops x (1 + {len(POOL_VIEWS)} views) + 1 held-out view "
        f"each (once; cached in {path.relative_to(ROOT)})")
    pool, pool_group, queries, query_group = [], [], [], []
    t0 = time.perf_counter()
    for g, img in enumerate(crops.values()):
        rng = np.random.default_rng(1000 + g)
        pool.append(enc.embed(img))
        pool_group.append(g)
        for kind in POOL_VIEWS:
            pool.append(enc.embed(camera_view(img, kind, rng, VIEW_HW)))
            pool_group.append(g)
        queries.append(enc.embed(camera_view(img, QUERY_VIEWS[g % len(QUERY_VIEWS)], rng, VIEW_HW)))
        query_group.append(g)
        if g % 100 == 99:
            log(f"  {g + 1}/{len(crops)} crops, {time.perf_counter() - t0:.0f} s")
    if own:
        enc.close()
    out = {"pool": np.stack(pool).astype(np.float32), "pool_group": np.asarray(pool_group, np.int32),
           "queries": np.stack(queries).astype(np.float32), "query_group": np.asarray(query_group, np.int32)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def perturbation_sigma(pool: np.ndarray, pool_group: np.ndarray) -> float:
    """Per-dimension std of the Gaussian fill-up noise: a perturbed copy lies about as far from its source
    as the source's nearest real descriptor of ANOTHER crop (a different-but-similar catalog item)."""
    sims = pool @ pool.T
    sims[pool_group[:, None] == pool_group[None, :]] = -2.0
    nn_dist = np.sqrt(np.maximum(2.0 - 2.0 * sims.max(axis=1), 0.0))
    return float(np.median(nn_dist) / np.sqrt(pool.shape[1]))


def filled_index_vectors(real: dict[str, np.ndarray], n: int, *, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``n`` L2-normalised vectors: every real pool descriptor, then Gaussian perturbations of randomly
    chosen real ones (renormalised). Returns (vectors, facts for the JSON)."""
    pool = real["pool"]
    sigma = perturbation_sigma(pool, real["pool_group"])
    rng = np.random.default_rng(seed)
    extra = max(0, n - len(pool))
    src = rng.integers(0, len(pool), size=extra)
    fill = pool[src] + rng.normal(0.0, sigma, size=(extra, pool.shape[1])).astype(np.float32)
    fill /= np.linalg.norm(fill, axis=1, keepdims=True)
    vectors = np.concatenate([pool, fill])[:n].astype(np.float32)
    facts = {"real": int(min(n, len(pool))), "perturbed": int(extra), "sigma_per_dim": round(sigma, 5),
             "median_cos_perturbed_to_source": round(float(np.median(np.sum(fill * pool[src], axis=1))), 4)
             if extra else None}
    return vectors, facts


# ------------------------------------------------------------------------------------------ measuring

def _exact(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    # What an exact search costs on the device: one mat-vec over the float32 matrix + top-k selection.
    # BLAS is held to 1 thread (see main): Annoy queries are single-threaded too, and a multi-threaded
    # gemv on a busy 2-core machine swung between 0.1 and 15 ms.
    scores = vectors @ q
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top])]


def measure_size(vectors: np.ndarray, queries: np.ndarray, *, n_trees_list=N_TREES, search_ks=SEARCH_KS,
                 work: Path = CACHE) -> list[dict]:
    """Every (n_trees, search_k) at this index size: recall@10 vs exact, median query ms, median exact ms
    (interleaved query by query), build s, file MB."""
    from annoy import AnnoyIndex
    n, dim = vectors.shape
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :TOP_K]
    q_lists = [q.tolist() for q in queries]
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    for n_trees in n_trees_list:
        ann = AnnoyIndex(dim, "angular")
        ann.set_seed(0)
        for i, v in enumerate(vectors):
            ann.add_item(i, v)
        t0 = time.perf_counter()
        ann.build(n_trees)
        build_s = time.perf_counter() - t0
        path = work / f"annoy-{n}-{n_trees}.ann"
        ann.save(str(path))
        ann.unload()
        size_mb = path.stat().st_size / 1e6
        ann = AnnoyIndex(dim, "angular")
        ann.load(str(path))  # mmap, as the device loads it
        for search_k in search_ks:
            for q in q_lists[:20]:  # warm the page cache
                ann.get_nns_by_vector(q, TOP_K, search_k)
            t_ann, t_exact, hits = [], [], 0
            for qi, (q, qv) in enumerate(zip(q_lists, queries)):
                t0 = time.perf_counter()
                got = ann.get_nns_by_vector(q, TOP_K, search_k)
                t1 = time.perf_counter()
                _exact(vectors, qv, TOP_K)
                t2 = time.perf_counter()
                t_ann.append(t1 - t0)
                t_exact.append(t2 - t1)
                hits += len(set(got) & set(truth[qi].tolist()))
            ann_ms, exact_ms = statistics.median(t_ann) * 1e3, statistics.median(t_exact) * 1e3
            row = {"size": n, "n_trees": n_trees, "search_k": search_k,
                   "recall_at_10": round(hits / (TOP_K * len(queries)), 4),
                   "query_ms": round(ann_ms, 4), "exact_ms": round(exact_ms, 4),
                   "time_ratio": round(ann_ms / exact_ms, 4), "build_s": round(build_s, 3),
                   "file_mb": round(size_mb, 2)}
            rows.append(row)
            log(f"{n:>7} {n_trees:>5} {search_k:>8} {row['recall_at_10']:>10.3f} {ann_ms:>9.3f} {exact_ms:>9.3f} "
                f"{row['time_ratio']:>7.3f} {build_s:>8.2f} {size_mb:>8.1f}")
        ann.unload()
        path.unlink()
    return rows


def recommend(rows: list[dict], size: int) -> dict:
    """Smallest n_trees (file size, build time), then smallest search_k, reaching both targets at ``size``."""
    at = [r for r in rows if r["size"] == size]
    ok = [r for r in at if r["recall_at_10"] >= RECALL_TARGET and r["time_ratio"] <= TIME_RATIO_TARGET]
    if not ok:
        best_recall = max((r for r in at if r["time_ratio"] <= TIME_RATIO_TARGET),
                          key=lambda r: r["recall_at_10"], default=None)
        return {"found": False, "best_recall_within_time_target": best_recall,
                "fastest_reaching_recall": min((r for r in at if r["recall_at_10"] >= RECALL_TARGET),
                                               key=lambda r: r["time_ratio"], default=None)}
    eff = lambda r: r["search_k"] if r["search_k"] > 0 else r["n_trees"] * TOP_K
    pick = min(ok, key=lambda r: (r["n_trees"], eff(r)))
    return {"found": True, "config": pick, "fastest": min(ok, key=lambda r: r["query_ms"])}


def plot(rows: list[dict], path: Path) -> None:
    """recall@10 vs Annoy/exact time, one panel per size, one line per n_trees."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for n_trees in sorted({r["n_trees"] for r in rows}):
            pts = [r for r in rows if r["size"] == size and r["n_trees"] == n_trees]
            ax.plot([r["time_ratio"] for r in pts], [r["recall_at_10"] for r in pts], "o-",
                    label=f"{n_trees} trees")
            for r in pts:
                ax.annotate(str(r["search_k"]), (r["time_ratio"], r["recall_at_10"]), fontsize=6,
                            xytext=(3, -8), textcoords="offset points")
        ax.axhline(RECALL_TARGET, color="grey", ls="--", lw=0.8)
        ax.axvline(TIME_RATIO_TARGET, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("median Annoy query time / exact numpy search time")
        ax.set_ylabel("recall@10")
        ax.set_title(f"{size:,} descriptors (128-d, angular); labels = search_k")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the Annoy sweep and write benchmarks/results/annoy.{json,png}."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks annoy", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=0, help="number of held-out queries (0 = all)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    real = real_descriptors()
    queries = real["queries"][: args.queries or None]
    log(f"real descriptors: {len(real['pool'])} in the pool (from {len(real['queries'])} crops), "
        f"{len(queries)} held-out queries; numpy BLAS: 1 thread; Annoy: 1 thread")
    log(f"{'size':>7} {'trees':>5} {'search_k':>8} {'recall@10':>10} {'annoy ms':>9} {'exact ms':>9} "
        f"{'ratio':>7} {'build s':>8} {'file MB':>8}")
    from threadpoolctl import threadpool_limits
    rows, fills = [], {}
    for size in args.sizes:
        vectors, facts = filled_index_vectors(real, size)
        fills[str(size)] = facts
        with threadpool_limits(limits=1, user_api="blas"):
            rows += measure_size(vectors, queries)
    largest = max(args.sizes)
    rec = recommend(rows, largest)
    default = next((r for r in rows if r["size"] == largest and r["n_trees"] == CONFIG_DEFAULT["n_trees"]
                    and r["search_k"] == CONFIG_DEFAULT["search_k"]), None)
    log("")
    log(f"fill-up: {json.dumps(fills)}")
    if rec["found"]:
        c = rec["config"]
        log(f"RECOMMENDED at {largest:,}: n_trees {c['n_trees']}, search_k {c['search_k']} → recall@10 "
            f"{c['recall_at_10']:.3f} (target ≥ {RECALL_TARGET}), {c['time_ratio']:.3f} of exact time "
            f"(target ≤ {TIME_RATIO_TARGET}), {c['query_ms']:.2f} ms vs {c['exact_ms']:.2f} ms, file {c['file_mb']} MB")
        f = rec["fastest"]
        log(f"fastest meeting both: n_trees {f['n_trees']}, search_k {f['search_k']} → recall@10 "
            f"{f['recall_at_10']:.3f}, ratio {f['time_ratio']:.3f}, file {f['file_mb']} MB")
    else:
        b, f = rec["best_recall_within_time_target"], rec["fastest_reaching_recall"]
        log(f"NO setting at {largest:,} reaches recall@10 ≥ {RECALL_TARGET} within {TIME_RATIO_TARGET} of exact time.")
        if b:
            log(f"  best recall within the time target: n_trees {b['n_trees']}, search_k {b['search_k']} → "
                f"{b['recall_at_10']:.3f} at ratio {b['time_ratio']:.3f}")
        if f:
            log(f"  fastest reaching the recall target: n_trees {f['n_trees']}, search_k {f['search_k']} → "
                f"ratio {f['time_ratio']:.3f} ({f['time_ratio'] / TIME_RATIO_TARGET:.1f}x the target)")
    if default:
        log(f"config default today (n_trees {CONFIG_DEFAULT['n_trees']}, search_k {CONFIG_DEFAULT['search_k']}) "
            f"at {largest:,}: recall@10 "
            f"{default['recall_at_10']:.3f}, ratio {default['time_ratio']:.3f}, file {default['file_mb']} MB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"bench": "annoy_recall", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "bundle": str(DEFAULT_BUNDLE.relative_to(ROOT)), "dim": int(real["pool"].shape[1]), "metric": "angular",
           "top_k": TOP_K, "queries": int(len(queries)), "real_pool": int(len(real["pool"])),
           "fill_up": fills, "exact_search": "float32 matrix @ query + argpartition top-10 (numpy, BLAS limited to 1 thread like Annoy)",
           "targets": {"recall_at_10": RECALL_TARGET, "time_ratio_max": TIME_RATIO_TARGET},
           "recommendation": rec, "config_default": {**CONFIG_DEFAULT, "measured": default},
           "rows": rows, "runtime_s": round(time.perf_counter() - t_start, 1)}
    (RESULTS / "annoy.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(rows, RESULTS / "annoy_recall.png")
    log(f"wrote {(RESULTS / 'annoy.json').relative_to(ROOT)}, {(RESULTS / 'annoy_recall.png').relative_to(ROOT)} "
        f"({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
