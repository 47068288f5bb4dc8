"""Scale: build throughput (in process, 1 and 2 worker processes, a 2-node Ray cluster simulated here) and a
large index in the configuration a user runs (default bundle, its enrolment views, catalog-adapted projection).

  python -m benchmarks scale [--images 48] [--sizes 100000] [--skip-ray] [--driver-images 2000]
                        [--enrol-views F ...] [--adapt-dim D] [--n-trees T] [--search-k K]

1. Build: ``index build`` of ``--images`` real catalog JPEGs (crops of shipped photos) with the default bundle and
   the default recognition settings (enrolment views, ORB, thumbnails); items/s of the item pass, descriptors/s
   against the model-limited rate (1 / median ``invoke()`` at encoder.num_threads), adaptation views apart.
2. For each size: an index of N items × (1 + len(enrol_views)) vectors — real descriptors of camera views
   perturbed (benchmarks/annoy_recall.py), projected by a learned whitening fitted on real views — written by the
   device's own ``write_index``; then a device process (no Ray, no builder) loads it and runs 200 lookups of real
   JPEG camera views: RSS (anonymous + file-backed), lookup time, and recall@10 of Annoy at index.search_k
   against exact search over the same projected vectors. ``--enrol-views`` / ``--adapt-dim`` / ``--n-trees`` /
   ``--search-k`` replace config.yaml's for this index (results under ``index_N`` plus the settings changed).
3. Driver memory (``--driver-images``): peak RSS of a fresh process that runs ``index build`` of that many real
   catalog JPEGs on 2 worker processes (the workers' memory is their own), default settings. Writes
   benchmarks/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "bench" / "scale"
RESULTS = ROOT / "bench" / "results" / "scale.json"
QUERIES = 200


def log(msg: str) -> None:
    print(msg, flush=True)


class AnonPeak:
    """The peak anonymous memory (RssAnon) of this process while the block runs, sampled every 50 ms: the part of
    a writer's memory that cannot be written back and dropped (VmHWM counts the mapped files' page cache too)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def now_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def __enter__(self) -> AnonPeak:
        self.peak_mb = self.now_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())


def _catalog(n: int) -> Path:
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
    folder = WORK / f"catalog-{n}"
    if not folder.is_dir() or len(list(folder.glob("*.jpg"))) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        photos = shipped_photos()
        crops = photo_crops(photos, -(-n // len(photos)), seed=11)
        for name in sorted(crops)[:n]:
            (folder / f"{name}.jpg").write_bytes(encode_jpeg(crops[name], 92))
    return folder


def bench_build(n_images: int, skip_ray: bool) -> dict:
    """Items/s of the item pass for each runner, on the same folder."""
    from edge_retrieval.catalog.build import ItemMaker, build_index
    from edge_retrieval.catalog.build_workers import ProcessRunner
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.model.encoder import load_encoder
    cfg = load_config(ROOT / "config.yaml")
    rc = cfg.recognition.model_copy(update={"adapt_max_items": 16})
    enc = load_encoder(cfg.encoder)
    folder = _catalog(n_images)
    x = enc.preprocess(np.zeros((480, 640, 3), np.uint8))
    for _ in range(5):
        enc.invoke(x)
    ts = []
    for _ in range(40):
        t0 = time.perf_counter()
        enc.invoke(x)
        ts.append(time.perf_counter() - t0)
    invoke_ms = statistics.median(ts) * 1e3
    per_item = 1 + len(rc.enrol_views)
    out = {"images": n_images, "bundle": enc.manifest.name, "invoke_ms": round(invoke_ms, 2),
           "interpreter_threads": enc.num_threads, "descriptors_per_item": per_item, "runs": {}}
    maker = ItemMaker(enc, rc, cfg.index.thumbnail_px)
    runners = {"in process (2 threads)": lambda: None,
               "1 worker process × 2 threads": lambda: ProcessRunner(maker.spec(2), 1, min_tasks=0),
               "2 worker processes × 1 thread": lambda: ProcessRunner(maker.spec(1), 2, min_tasks=0)}
    if not skip_ray:
        runners["Ray, 2 nodes × 1 CPU (ray.cluster_utils)"] = "ray"
    for name, make in runners.items():
        cluster = None
        if make == "ray":
            import ray
            from ray.cluster_utils import Cluster

            from edge_retrieval.catalog.ray_build import RayRunner, job_runtime_env
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
                     runtime_env=job_runtime_env())
            runner = RayRunner(maker.spec(1), address=cluster.address, batch_size=4)
        else:
            runner = make()
        rep = build_index(folder, maker, WORK / "build-index", n_trees=cfg.index.n_trees, progress=False,
                          runner=runner)
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
        ips = rep.items_per_s
        model_dps = 1e3 / invoke_ms
        out["runs"][name] = {"items_per_s": round(ips, 2), "items_seconds": round(rep.items_seconds, 2),
                             "descriptors_per_s_over_model_limited": round(ips * per_item / model_dps, 3),
                             "adapt_items": rep.adapt_items, "adapt_seconds": round(rep.adapt_seconds, 2),
                             "workers": rep.workers, "skipped": len(rep.skipped)}
        log(f"   {name:42s} {ips:6.2f} items/s ({rep.items_seconds:.1f} s) = {ips * per_item:.1f} descriptors/s "
            f"÷ model-limited {model_dps:.1f} (1/{invoke_ms:.2f} ms) = {ips * per_item / model_dps:.3f}")
        log(f"   {'':42s} adaptation views: {rep.adapt_items} items in {rep.adapt_seconds:.1f} s (own pass)")
    enc.close()
    return out


class _PeakAfterItems:
    """A runner that notes the driver's RSS (and peak so far) once the item pass has streamed its last result."""

    def __init__(self, runner):
        self.runner, self.after_items = runner, None

    def map(self, tasks):
        from benchmarks.speed import rss_now_mb
        yield from self.runner.map(tasks)
        self.after_items = self.after_items or rss_now_mb()

    def describe(self):
        return self.runner.describe()

    def close(self):
        self.runner.close()


def driver_peak(n_images: int) -> dict:
    """In a fresh process: ``index build`` of ``n_images`` JPEGs on 2 worker processes; the driver's peak RSS
    after the item pass and after the whole build (adaptation fit, Annoy build in memory, write)."""
    from benchmarks.speed import rss_now_mb
    from edge_retrieval.catalog.build import ItemMaker, build_index
    from edge_retrieval.catalog.build_workers import ProcessRunner
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.model.encoder import load_encoder
    cfg = load_config(ROOT / "config.yaml")
    rc = cfg.recognition.model_copy(update={"adapt_max_items": 16})  # the items, not the fixed adaptation cost
    enc = load_encoder(cfg.encoder)
    maker = ItemMaker(enc, rc, cfg.index.thumbnail_px)
    start = rss_now_mb()
    runner = _PeakAfterItems(ProcessRunner(maker.spec(1), 2, min_tasks=0))
    rep = build_index(_catalog(n_images), maker, WORK / "driver-index", n_trees=cfg.index.n_trees, progress=False,
                      runner=runner)
    gen = WORK / "driver-index" / rep.generation
    return {"images": n_images, "indexed": rep.indexed, "seconds": round(rep.seconds, 1), "before_build": start,
            "after_items": runner.after_items, "after_build": rss_now_mb(),
            "generation_mb": round(sum(p.stat().st_size for p in gen.iterdir()) / 2**20, 1)}


def index_settings(over: dict) -> dict:
    """enrol_views, adapt_dim, n_trees, search_k of the big index: config.yaml's, with ``over`` replacing some."""
    from edge_retrieval.core.config_file import load_config
    cfg = load_config(ROOT / "config.yaml")
    return {"enrol_views": cfg.recognition.enrol_views, "adapt_dim": cfg.recognition.adapt_dim,
            "n_trees": cfg.index.n_trees, "search_k": cfg.index.search_k, **over}


def build_big(n: int, settings: dict, tag: str) -> dict:
    """The N-item index (cached by size and settings), written by write_index."""
    from benchmarks.annoy_recall import perturbation_sigma
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
    from edge_retrieval.index.reader import CatalogItem
    from edge_retrieval.index.writer import write_index
    from edge_retrieval.model.adaptation import Projection, adaptation_views, fit_lw
    from edge_retrieval.model.encoder import load_encoder
    cfg = load_config(ROOT / "config.yaml")
    rc = cfg.recognition.model_copy(update={"enrol_views": settings["enrol_views"], "adapt_dim": settings["adapt_dim"]})
    path = WORK / f"index-{n}{tag}"
    stamp = path / "bench-stamp.json"
    enc = load_encoder(cfg.encoder)
    want = {"n": n, "sha256": enc.sha256, "views": rc.enrol_views, "dim": rc.adapt_dim, "trees": settings["n_trees"],
            "v": 2}
    real_path = WORK / f"real-{enc.sha256[:12]}.npz"
    if real_path.is_file():
        z = dict(np.load(real_path))
    else:
        crops = photo_crops(shipped_photos(), 8, seed=5)
        base, views, group = [], [], []
        for g, (_name, img) in enumerate(sorted(crops.items())):
            base.append(enc.embed(img))
            views.append(np.stack([enc.embed(v) for v in adaptation_views(img, 4, seed=g)]))
        z = {"base": np.stack(base), "views": np.stack(views)}
        np.savez(real_path, **z)
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return {"path": path, "real": z}
    base, views = z["base"], z["views"]
    mean, matrix = fit_lw(base, views, rc.adapt_dim, rc.adapt_shrinkage)
    proj = Projection(mean, matrix, len(base), views.shape[1], enc.sha256)
    pool = np.concatenate([base, views.reshape(-1, base.shape[1])])
    group = np.concatenate([np.arange(len(base)), np.repeat(np.arange(len(base)), views.shape[1])])
    sigma = perturbation_sigma(pool, group)
    rng = np.random.default_rng(0)
    per = 1 + len(rc.enrol_views)
    log(f"   writing a {n:,}-item index ({per} vectors each, {enc.dim}-d → projected {proj.dim}-d) …")
    generate_s = 0.0

    def items():  # streamed into write_index: the bench holds no item either
        nonlocal generate_s
        for i in range(n):
            t = time.perf_counter()
            src = pool[rng.integers(len(pool))]
            v = src + rng.normal(0, sigma, (per, src.size)).astype(np.float32) * np.array(
                [[1.0]] + [[0.5]] * (per - 1), np.float32)
            item = CatalogItem(f"item/{i:07d}", f"Item {i}", (v / np.linalg.norm(v, axis=1, keepdims=True))
                               .astype(np.float16))
            generate_s += time.perf_counter() - t
            yield item

    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        write_index(path, items(), bundle_sha256=enc.sha256, n_trees=settings["n_trees"], dim=enc.dim,
                    projection=proj)
    write_s = time.perf_counter() - t0 - generate_s
    from benchmarks.speed import peak_rss_mb
    peak = peak_rss_mb()
    stamp.write_text(json.dumps(want))
    (path / "bench-write.json").write_text(json.dumps({"write_index_s": round(write_s, 1), "generate_s": round(
        generate_s, 1), "writer_peak_rss_mb": round(peak, 1), "writer_peak_anon_mb": round(anon.peak_mb, 1)}))
    enc.close()
    return {"path": path, "real": z}


def worker_rss(path: str, queries: int, search_k: int) -> dict:
    """A device process: the default bundle + the index at ``path``, ``queries`` lookups of real JPEG views."""
    from benchmarks.speed import rss_now_mb
    stages = {"start": rss_now_mb()}
    from edge_retrieval.core.config import RecognitionConfig
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import load_encoder
    from edge_retrieval.search.lookup import Lookup
    cfg = load_config(ROOT / "config.yaml")
    jpegs = [p.read_bytes() for p in sorted((WORK / "queries").glob("*.jpg"))]  # made by the parent: no skimage here
    enc = load_encoder(cfg.encoder)
    stages["encoder_loaded"] = rss_now_mb()
    idx = CatalogIndex.load(path, expected_bundle_sha256=enc.sha256, search_k=search_k)
    stages["index_loaded"] = rss_now_mb()
    lk = Lookup(enc, idx, RecognitionConfig(enrol_views=[], features=False, verify=False), top_k=cfg.index.top_k)
    ts = []
    for i in range(queries):
        t0 = time.perf_counter()
        lk.lookup_bytes(jpegs[i % len(jpegs)])
        ts.append(time.perf_counter() - t0)
    stages["after_queries"] = rss_now_mb()
    from edge_retrieval.imaging.codec import decode_image
    qv = idx.projection.apply(np.stack([enc.embed(decode_image(b)) for b in jpegs[:20]]))
    t0 = time.perf_counter()
    for v in qv:
        idx._ann.get_nns_by_vector(v.tolist(), 10, search_k)
    ann_ms = (time.perf_counter() - t0) / len(qv) * 1e3
    return {"items": idx.size, "queries": queries, "stages": stages, "lookup_ms": round(statistics.median(ts) * 1e3, 2),
            "annoy_query_ms": round(ann_ms, 3), "search_k": search_k}


def recall_at_10(path: Path, real: dict, search_k: int) -> float:
    """Annoy's top-10 vectors vs exact search over the same projected vectors, for held-out real views."""
    from annoy import AnnoyIndex

    from edge_retrieval.index.reader import CatalogIndex
    with CatalogIndex.load(path, expected_bundle_sha256=None) as idx:
        proj = idx.projection
        ann = AnnoyIndex(proj.dim, "angular")
        ann.load(str(idx.path / "vectors.ann"))
        m = ann.get_n_items()
        searched = np.empty((m, proj.dim), np.float32)
        step = 200_000
        for a in range(0, m, step):
            searched[a:a + step] = proj.apply(np.asarray(idx.vectors()[a:a + step], np.float32))
        qs = proj.apply(real["views"][:, -1])  # one real view per crop
        hits = 0
        for q in qs:
            exact = set(np.argpartition(-(searched @ q), 10)[:10].tolist())
            hits += len(exact & set(ann.get_nns_by_vector(q.tolist(), 10, search_k)))
        ann.unload()
    return hits / (10 * len(qs))


def _query_jpegs() -> None:
    """40 real 640x480 camera-view JPEGs for the device process (written once)."""
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
    from edge_retrieval.imaging.synthetic_views import camera_view
    folder = WORK / "queries"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == 40:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(9)
    crops = list(photo_crops(shipped_photos(), 2, seed=5).values())
    for i in range(40):
        (folder / f"{i:02d}.jpg").write_bytes(encode_jpeg(camera_view(crops[i % len(crops)], "perspective", rng,
                                                                      (480, 640)), 85))


def run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--worker", *args], cwd=ROOT, capture_output=True,
                         text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed (rc {out.returncode}): {out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    """Run the scale bench and write benchmarks/results/scale.json."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=48, help="catalog images of the build throughput runs")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000], help="index sizes (items)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--driver-images", type=int, default=0, help="images of the driver-memory build (0: skip)")
    ap.add_argument("--enrol-views", type=float, nargs="*", help="the big index's enrol_views (default: config.yaml's)")
    ap.add_argument("--adapt-dim", type=int, help="the big index's projected dim (default: config.yaml's)")
    ap.add_argument("--n-trees", type=int, help="the big index's Annoy trees (default: config.yaml's)")
    ap.add_argument("--search-k", type=int, help="Annoy search_k of the lookups (default: config.yaml's)")
    ap.add_argument("--worker", nargs="*")
    args = ap.parse_args(argv)
    if args.worker:
        out = (driver_peak(int(args.worker[1])) if args.worker[0] == "driver" else
               worker_rss(args.worker[0], int(args.worker[1]), int(args.worker[2])))
        print("RESULT " + json.dumps(out))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.skip_build:
        log(f"1. build throughput, {args.images} images, default bundle and recognition settings")
        result["build"] = bench_build(args.images, args.skip_ray)
    over = {k: v for k, v in (("enrol_views", args.enrol_views), ("adapt_dim", args.adapt_dim),
                              ("n_trees", args.n_trees), ("search_k", args.search_k)) if v is not None}
    settings = index_settings(over)
    search_k = settings["search_k"]
    tag = "".join(f"_{k}={v}" for k, v in over.items() if k != "search_k").replace(" ", "")
    for n in args.sizes:
        log(f"2. {n:,} items")
        big = build_big(n, settings, tag)
        path = big["path"]
        sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in (path / "current").resolve().iterdir()}
        _query_jpegs()
        rss = run_worker(str(path), str(QUERIES), str(search_k))
        rec = recall_at_10(path, big["real"], search_k)
        entry = {**rss, "files_mb": sizes, "recall_at_10": round(rec, 3),
                 **json.loads((path / "bench-write.json").read_text())}
        entry["settings"] = settings
        result[f"index_{n}" + "".join(f"_{k}={v}" for k, v in over.items()).replace(" ", "")] = entry
        st = rss["stages"]["after_queries"]
        log(f"   files (MB): {sizes}")
        log(f"   write_index {entry['write_index_s']} s; after {QUERIES} lookups: RSS {st['rss_mb']:.0f} MB "
            f"(anonymous {st['anon_mb']:.0f} + file-backed {st['file_backed_mb']:.0f}); lookup {rss['lookup_ms']} ms, "
            f"Annoy search {rss['annoy_query_ms']} ms; recall@10 {rec:.3f} at search_k {search_k}")
        log("   by stage: " + ", ".join(f"{k} {v['rss_mb']:.0f} ({v['anon_mb']:.0f}+{v['file_backed_mb']:.0f})"
                                       for k, v in rss["stages"].items()))
    if args.driver_images:
        log(f"3. driver memory: index build of {args.driver_images} images on 2 worker processes")
        _catalog(args.driver_images)  # made here, so the measured process only builds
        d = result["driver"] = run_worker("driver", str(args.driver_images))
        log(f"   driver RSS: before the build {d['before_build']['rss_mb']:.0f} MB, peak by the end of the item pass "
            f"{d['after_items']['peak_so_far_mb']:.0f} MB, peak of the whole build {d['after_build']['peak_so_far_mb']:.0f}"
            f" MB (generation on disk {d['generation_mb']} MB; {d['seconds']} s)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
