"""Patch-CKN against what the device does today (``python -m benchmarks patch_ckn``; issue 32):

  (a) local: at the same ORB keypoints (the device's detector, its catalog / query settings), Patch-CKN
      descriptors vs ORB's, matched with the same ratio test + one-to-one and verified by the same homography code
      (edge_retrieval/model/local_features.py): verified points with the right item, correct / wrong accepts among
      the default bundle's top 10 at the shipped inlier threshold, open-set false accepts, and the cost per frame;
  (b) global: Patch-CKN descriptors VLAD-aggregated (the paper's recipe; k-means vocabulary) vs the default
      bundle's global descriptor, recall@1 on the same views.

Held out by source: the CKNs and the VLAD vocabulary are trained on **ukui-wallpapers** only; in-catalog queries are
the camera-view benchmark's (benchmarks/views.py: crops of the photos that ship in scikit-image / scikit-learn /
matplotlib); the open set is views of **gnome-backgrounds** + empty tables (recognition.open_set with that package).
Bundles are built with the converter CLI into var/bench/patch_ckn (cached; --rebuild to retrain).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.views import CACHE, RESULTS, camera_view_set, run_module, write_json

TRAIN_PACKAGE, OPEN_PACKAGE = "ukui-wallpapers", "gnome-backgrounds"
# name → converter arguments (beside --train-images / --out)
VARIANTS = {
    "ckn2": ["--views-per-image", "8"],
    "ckn1": ["--views-per-image", "8", "--layers", "1"],
    "ckn2-int8": ["--views-per-image", "8", "--quantize", "int8"],
}
TOP_K = 10
VOCABULARY = 64           # VLAD centroids
COST_FRAMES = 30
OPEN_MAX_PIXELS = 64_000_000  # gnome-backgrounds' 4096² WebP files need this decode budget
ROOT = CACHE / "patch_ckn"


def _train_folder() -> Path:
    from edge_retrieval.convert.images import training_pool_files
    folder = ROOT / "train_ukui"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for path in training_pool_files((TRAIN_PACKAGE,)):
        (folder / path.name).symlink_to(path)
    return folder


def build(name: str, train: Path, force: bool) -> Path:
    """The bundle ``name`` (built with the converter CLI unless cached)."""
    out = ROOT / "bundles" / name
    if (out / "manifest.json").is_file() and not force:
        return out
    args = ["edge_retrieval.convert", "patch-ckn", "--train-images", str(train), "--out", str(out), *VARIANTS[name]]
    print(f"  building {name}: python -m {' '.join(args)}", flush=True)
    t = time.perf_counter()
    run_module(args, log=out.parent / f"{name}.log")
    print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def _read(path: Path) -> np.ndarray:
    from edge_retrieval.convert.images import MAX_PIXELS  # the converter's limit: wallpapers are up to 4K
    from edge_retrieval.imaging.codec import read_image
    return read_image(path, MAX_PIXELS)


def _features(images: list[np.ndarray], query: bool, describers: dict) -> dict[str, list]:
    """ORB Features and each describer's Features at the same keypoints, per image."""
    from edge_retrieval.core.config import RecognitionConfig
    from edge_retrieval.model.local_features import Features
    from edge_retrieval.model.patch_descriptors import orb_keypoints
    cfg = RecognitionConfig()
    out: dict[str, list] = {"orb": [], **{n: [] for n in describers}}
    for img in images:
        gray, kps, desc = orb_keypoints(img, cfg, query=query)
        size_wh = (int(gray.shape[1]), int(gray.shape[0]))
        if desc is None or not kps:
            out["orb"].append(Features.empty(size_wh))
        else:
            xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
            out["orb"].append(Features(xy, np.ascontiguousarray(desc, np.uint8), size_wh))
        for name, d in describers.items():
            out[name].append(d.features_at(gray, kps))
    return out


def _inliers(qf: list, cf: list, cands: np.ndarray, truth: np.ndarray,
             epipolar_at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inliers of every query with its top-K candidates [Q, K], and with its true item [Q] (-1: open set). The
    homography alone, or with ``epipolar_at`` the device's full verification (epipolar geometry tried below that
    many homography inliers)."""
    from edge_retrieval.core.config import RecognitionConfig
    from edge_retrieval.model.local_features import match_inliers, verify
    cfg = RecognitionConfig()

    def count(q, c) -> int:
        if epipolar_at is None:
            return match_inliers(q, c, cfg)
        return verify(q, c, cfg, accept_inliers=epipolar_at).inliers
    inl = np.zeros(cands.shape, int)
    true_inl = np.full(len(qf), -1)
    for i, q in enumerate(qf):
        for j, c in enumerate(cands[i]):
            inl[i, j] = count(q, cf[c])
        if truth[i] >= 0:
            hit = np.flatnonzero(cands[i] == truth[i])
            true_inl[i] = inl[i, hit[0]] if len(hit) else count(q, cf[truth[i]])
    return inl, true_inl


def _rates(inl, true_inl, cands, truth, threshold: int) -> dict:
    known = truth >= 0
    best = inl.argmax(1)
    top = inl[np.arange(len(inl)), best]
    named = cands[np.arange(len(inl)), best]
    accepted = top >= threshold
    return {"threshold": threshold,
            "correct_accept": round(float(np.mean((accepted & (named == truth))[known])), 4),
            "wrong_accept": round(float(np.mean((accepted & (named != truth))[known])), 4),
            "open_set_false_accept": round(float(np.mean(accepted[~known])), 4)}


def local_report(inl, true_inl, cands, truth, threshold: int) -> dict:
    """Verified points with the true item, and the decision at ``threshold`` and at the lowest threshold with no
    open-set false accept (the same false-accept rate for every descriptor)."""
    known = truth >= 0
    ti = true_inl[known]
    zero_fa = int(inl[~known].max(initial=0)) + 1
    return {"verified_points_median": float(np.median(ti)), "verified_points_mean": round(float(ti.mean()), 1),
            "true_pair_verified_share": round(float(np.mean(ti >= threshold)), 4),
            "at_shipped_threshold": _rates(inl, true_inl, cands, truth, threshold),
            "at_zero_false_accept": _rates(inl, true_inl, cands, truth, max(threshold, zero_fa)),
            "open_set_max_inliers": int(inl[~known].max(initial=0))}


def _median_ms(fn, runs: list) -> float:
    times = []
    for arg in runs:
        t = time.perf_counter()
        fn(arg)
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 2)


def cost(frames: list[np.ndarray], cat_feats: dict, truth_idx: list[int], bundles: dict) -> dict:
    """Median ms per frame: ORB as the device extracts it vs detection + patches + the bundle (1 and 2 threads);
    one verification (query keypoints x the true item's) with each descriptor; catalog bytes per keypoint."""
    from edge_retrieval.core.config import RecognitionConfig
    from edge_retrieval.model.local_features import match_inliers
    from edge_retrieval.model.patch_descriptors import PatchDescriber, keypoint_patches, orb_keypoints
    cfg = RecognitionConfig()
    out: dict = {"frames": len(frames), "orb_detect_and_describe_ms": _median_ms(
        lambda f: orb_keypoints(f, cfg, query=True), frames)}
    out["orb_detect_only_ms"] = _median_ms(lambda f: orb_keypoints(f, cfg, query=True, compute_orb=False), frames)
    detected = [orb_keypoints(f, cfg, query=True, compute_orb=False) for f in frames]
    cuts = [(g, np.array([k.pt for k in kps], np.float32), np.array([k.size for k in kps]),
             np.array([k.angle for k in kps])) for g, kps, _ in detected]
    out["keypoints_median"] = int(statistics.median(len(c[1]) for c in cuts))
    describers = {n: {t: PatchDescriber(b, num_threads=t) for t in (1, 2)} for n, b in bundles.items()}
    first = next(iter(describers.values()))[2]
    out["cut_patches_ms"] = _median_ms(lambda c: keypoint_patches(*c, first.patch_px, first.support), cuts)
    patches = [keypoint_patches(*c, first.patch_px, first.support) for c in cuts]
    qf = {"orb": _features(frames, True, {})["orb"]}
    for n, by_threads in describers.items():
        for t, d in by_threads.items():
            out[f"{n}_describe_ms_{t}_thread"] = _median_ms(d.describe, patches)
        qf[n] = [by_threads[2].features_at(g, kps) for g, kps, _ in detected]
    pairs = list(zip(range(len(frames)), truth_idx))
    for n in qf:
        out[f"{n}_verify_one_candidate_ms"] = _median_ms(
            lambda p, n=n: match_inliers(qf[n][p[0]], cat_feats[n][p[1]], cfg), pairs)
        out[f"{n}_bytes_per_keypoint"] = int(cat_feats[n][0].desc.shape[1] * cat_feats[n][0].desc.itemsize)
    for n in describers:
        best = min(out[f"{n}_describe_ms_1_thread"], out[f"{n}_describe_ms_2_thread"])
        out[f"{n}_frame_ms"] = round(out["orb_detect_only_ms"] + out["cut_patches_ms"] + best, 2)
        out[f"{n}_frame_vs_orb"] = round(out[f"{n}_frame_ms"] / out["orb_detect_and_describe_ms"], 1)
    return out


def vocabulary(describer, seed: int = 0) -> np.ndarray:
    """k-means centroids of Patch-CKN descriptors at ORB keypoints of the training source (its photos and three
    camera views of each)."""
    from sklearn.cluster import KMeans

    from edge_retrieval.convert.images import training_pool_files
    from edge_retrieval.core.config import RecognitionConfig
    from edge_retrieval.imaging.synthetic_views import VIEW_KINDS, camera_view
    rng = np.random.default_rng(seed)
    images = []
    for path in training_pool_files((TRAIN_PACKAGE,)):
        img = _read(path)
        images.append(img)
        images += [camera_view(img, VIEW_KINDS[int(rng.integers(len(VIEW_KINDS)))], rng) for _ in range(3)]
    cfg = RecognitionConfig()
    desc = np.concatenate([describer.features(img, cfg, query=True).desc for img in images])
    km = KMeans(n_clusters=VOCABULARY, n_init=2, random_state=seed).fit(desc[rng.permutation(len(desc))[:40000]])
    return km.cluster_centers_.astype(np.float32)


def global_report(cat: list, queries: list, truth: np.ndarray, kinds: list[str], centroids: np.ndarray,
                  sscd_cat: np.ndarray, sscd_q: np.ndarray) -> dict:
    """recall@1 (exact cosine) of CKN-VLAD and of the default bundle on the same in-catalog views."""
    from edge_retrieval.convert.vlad import vlad_hard  # TensorFlow is imported here, after the timings
    from edge_retrieval.imaging.synthetic_views import VIEWPOINT_KINDS

    def vlad(feats):
        return np.stack([vlad_hard(f.desc, centroids) if len(f) else np.zeros(centroids.size, np.float32)
                         for f in feats])
    vc, vq = vlad(cat), vlad(queries)
    out = {"vlad_dim": int(vc.shape[1]), "vocabulary": VOCABULARY}
    plane = np.array([k not in VIEWPOINT_KINDS for k in kinds])
    table = np.array([k.startswith("table") for k in kinds])
    for name, (c, q) in {"ckn_vlad": (vc, vq), "default_bundle": (sscd_cat, sscd_q)}.items():
        hit = (q @ c.T).argmax(1) == truth
        out[name] = {key: round(float(hit[sel].mean()), 4) if sel.any() else None for key, sel in
                     {"recall_at_1": np.ones_like(plane), "print_views": plane, "prints_on_a_table": table,
                      "out_of_plane": ~plane}.items()}
    return out


def main(argv: list[str]) -> int:
    """Build the bundles (cached), run (a) and (b), print and write benchmarks/results/patch_ckn.json."""
    from benchmarks.recognition import open_set
    from edge_retrieval.core.config import DEFAULT_BUNDLE
    from edge_retrieval.model.bundle import load_manifest
    from edge_retrieval.model.encoder import Encoder
    from edge_retrieval.model.patch_descriptors import PatchDescriber
    p = argparse.ArgumentParser(prog="python -m benchmarks patch_ckn")
    p.add_argument("--rebuild", action="store_true", help="retrain the bundles")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--max-queries", type=int, default=0, help="rate on the first N in-catalog views (0 = all)")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    train = _train_folder()
    bundles = {n: build(n, train, args.rebuild) for n in names}
    manifests = {n: load_manifest(b).model_dump(mode="json") for n, b in bundles.items()}
    describers = {n: PatchDescriber(b, num_threads=2) for n, b in bundles.items()}
    threshold = load_manifest(DEFAULT_BUNDLE, verify_sha=False).calibration.accept_inliers

    data = camera_view_set()
    openq = open_set(ROOT / f"open_set_{OPEN_PACKAGE}", packages=(OPEN_PACKAGE,), max_pixels=OPEN_MAX_PIXELS)
    photos = {p.parent.relative_to(data.catalog).as_posix(): p for p in data.catalog.rglob("*.jpg")}  # a folder an item
    items = sorted(photos)
    index = {item: i for i, item in enumerate(items)}
    known = data.queries[: args.max_queries] if args.max_queries else data.queries
    print(f"catalog {len(items)} items; {len(known)} in-catalog views; {len(openq)} open-set views "
          f"({OPEN_PACKAGE} + empty tables); CKN trained on {TRAIN_PACKAGE}; verified at >= {threshold} points",
          flush=True)
    cat_imgs = [_read(photos[i]) for i in items]
    q_imgs = [_read(data.root / q["path"]) for q in known] + [_read(Path(q["path"])) for q in openq]
    truth = np.array([index[q["item"]] for q in known] + [-1] * len(openq))

    t = time.perf_counter()
    with Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=2) as enc:
        sscd_cat = np.stack([enc.embed(img) for img in cat_imgs])
        sscd_q = np.stack([enc.embed(img) for img in q_imgs])
    cands = np.argsort(-(sscd_q @ sscd_cat.T), axis=1)[:, :TOP_K]
    print(f"  default bundle: embedded in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    cat_feats = _features(cat_imgs, False, describers)
    q_feats = _features(q_imgs, True, describers)
    print(f"  features: {time.perf_counter() - t:.0f} s", flush=True)

    report: dict = {"held_out": {"trained_on": TRAIN_PACKAGE, "catalog_and_views": "benchmarks/views.py (pip photos)",
                                 "open_set": f"{OPEN_PACKAGE} + empty tables"},
                    "catalog_items": len(items), "in_catalog_views": len(known), "open_set_views": len(openq),
                    "candidates": f"top {TOP_K} of the default bundle ({DEFAULT_BUNDLE.name}), exact cosine",
                    "local": {}, "bundles": {n: {k: manifests[n]["source"].get(k) for k in
                                                 ("layers", "training_s", "peak_rss_mb", "ckn_layer", "pca")}
                                             | {"output_dim": manifests[n]["output_dim"],
                                                "quantization": manifests[n]["quantization"]} for n in names}}
    verified: dict[str, np.ndarray] = {}
    for name in ["orb_epipolar", "orb", *names]:
        t = time.perf_counter()
        feats = name.removesuffix("_epipolar")
        inl, true_inl = _inliers(q_feats[feats], cat_feats[feats], cands, truth,
                                 threshold if name.endswith("_epipolar") else None)
        report["local"][name] = local_report(inl, true_inl, cands, truth, threshold)
        verified[name] = true_inl[truth >= 0] >= threshold
        if not name.startswith("orb"):  # paired: in-catalog views whose true item verifies with one descriptor and not the other
            report["local"][name]["paired_vs_orb"] = {
                "verified_only_here": int((verified[name] & ~verified["orb"]).sum()),
                "verified_only_by_orb": int((verified["orb"] & ~verified[name]).sum())}
        print(f"  {name}: {json.dumps(report['local'][name])} ({time.perf_counter() - t:.0f} s)", flush=True)
    n_known = len(known)
    frames = q_imgs[:n_known][:: max(1, n_known // COST_FRAMES)][:COST_FRAMES]
    report["cost"] = cost(frames, cat_feats, list(truth[:n_known][:: max(1, n_known // COST_FRAMES)][:COST_FRAMES]),
                          bundles)
    print(f"  cost: {json.dumps(report['cost'])}", flush=True)
    main_name = names[0]
    centroids = vocabulary(describers[main_name])
    kinds = [q["kind"] for q in known]
    report["global"] = {"descriptor": main_name, **global_report(cat_feats[main_name], q_feats[main_name][:n_known],
                                                                 truth[:n_known], kinds, centroids, sscd_cat,
                                                                 sscd_q[:n_known])}
    print(f"  global: {json.dumps(report['global'])}", flush=True)
    write_json(RESULTS / "patch_ckn.json", report)
    print(f"wrote {RESULTS / 'patch_ckn.json'}")
    return 0
