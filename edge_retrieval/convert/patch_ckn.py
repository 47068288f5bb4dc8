"""Patch-CKN (Paulin et al., "Local Convolutional Features with Unsupervised Training for Image Retrieval", ICCV
2015): a patch descriptor from a Convolutional Kernel Network trained without labels, exported as a TFLite bundle
whose input is a batch of grayscale keypoint patches.

  python -m edge_retrieval.convert patch-ckn --train-images photos/ --out bundles/patch-ckn

Patches are cut at the ORB keypoints of the training images and of camera-like views of them, exactly as the device
cuts them (edge_retrieval/model/patch_descriptors.py: centre, orientation and size of the keypoint). Network
(``--layers 2``, the default; the paper's gradient-map input, its best for retrieval):
  patch P×P gray → gradient map (12 orientations, fixed) → Gaussian pooling /4 → CKN layer (s×s sub-patches,
  ``--filters`` L, fitted: edge_retrieval/convert/ckn.py) → Gaussian pooling /2 → 4×4×L → L2 → PCA (``--pca``) → L2
``--layers 1`` stops after the gradient map (pooled /8 to 4×4×12: nothing learned but the PCA; a smooth SIFT).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from edge_retrieval.convert.build import fit_pca, training_views
from edge_retrieval.convert.ckn import CKNLayer, GaussianPool, GradientMap, fit_ckn_layer, subpatches
from edge_retrieval.convert.errors import ConverterError
from edge_retrieval.convert.export import to_tflite
from edge_retrieval.convert.images import TRAINING_PACKAGES, ImageSet, training_pool_files
from edge_retrieval.convert.layers import L2Normalize
from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.model.bundle import PATCH_DESCRIPTOR, InputSpec, Manifest, write_bundle
from edge_retrieval.model.patch_descriptors import PatchDescriber, keypoint_patches, orb_keypoints

log = logging.getLogger(__name__)

# What the training photos' licences are, for the manifest (from /usr/share/doc/<package>/copyright).
PACKAGE_LICENCES = {
    "gnome-backgrounds": "CC-BY-SA-3.0 (adwaita and most images), CC-BY-SA-2.0 / CC-BY-2.0 for a few: per image in "
                         "/usr/share/doc/gnome-backgrounds/copyright",
    "ukui-wallpapers": "CC-BY-SA-3.0 (Ubuntu Kylin community): /usr/share/doc/ukui-wallpapers/copyright",
}
SUBPATCHES_PER_PATCH = 8   # positions of each training patch's layer-1 map that the CKN layer is fitted on
REPORT_PATCHES = 2000      # held-back training patches for the Keras-vs-TFLite comparison


@dataclass
class PatchCKNOptions:
    """Everything ``python -m edge_retrieval.convert patch-ckn`` takes."""

    out: Path
    patch_px: int = 32
    support: float = 1.0          # patch side = support × the ORB keypoint's size
    layers: int = 2               # 1: gradient map only; 2: + one CKN layer fitted on the training patches
    filters: int = 64             # CKN layer filters L (descriptor before PCA: 4·4·L)
    subpatch: int = 3             # CKN layer sub-patch side s
    pca_dim: int = 128            # 0 = no PCA
    pairs: int = 300_000          # sub-patch pairs the SGD sees
    views_per_image: int = 4      # each training image plus N-1 camera-like views
    patches_per_view: int = 300   # keypoints sampled per view
    quantize: str = "float32"
    name: str | None = None
    seed: int = 0


def training_patches(images: list[np.ndarray], views_per_image: int, per_view: int, patch_px: int,
                     support: float, seed: int) -> np.ndarray:
    """Grayscale patches [N, P, P] uint8 at ≤ ``per_view`` random ORB keypoints (the catalog detector's) of each
    training image and its camera-like views, cut as the device cuts them."""
    cfg = RecognitionConfig()
    rng = np.random.default_rng(seed + 3)
    out = []
    for view in training_views(images, views_per_image, seed):
        gray, kps, _ = orb_keypoints(view, cfg, compute_orb=False)
        if not kps:
            continue
        take = rng.permutation(len(kps))[:per_view]
        kps = [kps[i] for i in take]
        out.append(keypoint_patches(gray, np.array([k.pt for k in kps], np.float32), np.array([k.size for k in kps]),
                                    np.array([k.angle for k in kps]), patch_px, support))
    if not out:
        raise ConverterError("no ORB keypoints in the training images (are they flat?)")
    return np.concatenate(out)


def _as_input(patches: np.ndarray) -> np.ndarray:
    return patches[..., None].astype(np.float32)


def _trunk(opts: PatchCKNOptions, layer=None) -> keras.Model:
    """Patch → pooled map: the layer-1 map (``layer`` None: what the CKN layer is fitted on, or the whole
    trunk when ``opts.layers`` is 1) or the layer-2 map."""
    inp = keras.Input((opts.patch_px, opts.patch_px, 1), name="patch")
    x = GradientMap(name="gradient_map")(inp)
    if opts.layers == 1:
        x = GaussianPool(8, name="pool1")(x)
    else:
        x = GaussianPool(4, name="pool1")(x)
        if layer is not None:
            w, eta, sigma = layer
            filt = w.reshape(-1, opts.subpatch, opts.subpatch, int(x.shape[-1])).transpose(1, 2, 3, 0)
            x = CKNLayer(filt, eta, sigma, name="ckn2")(x)
            x = GaussianPool(2, name="pool2")(x)
    return keras.Model(inp, x, name="patch_ckn_trunk")


def _descriptor(trunk: keras.Model, pca: tuple[np.ndarray, np.ndarray] | None) -> keras.Model:
    x = L2Normalize(name="l2_pre")(keras.layers.Flatten(name="flat")(trunk.output))
    if pca is not None:
        dense = keras.layers.Dense(pca[0].shape[1], name="pca")
        x = dense(x)
        dense.set_weights(list(pca))
    return keras.Model(trunk.input, L2Normalize(name="l2")(x), name="patch_ckn")


def training_licence(train: ImageSet) -> dict:
    """The licences of what the descriptor learned from: the training files that a known Debian image package
    installed, counted per package with its licence; the rest counted as the user's own."""
    files = {p.resolve(): pkg for pkg in TRAINING_PACKAGES for p in training_pool_files((pkg,))}
    counts: dict[str, int] = {}
    for name in train.names:
        pkg = files.get((Path(train.folder) / name).resolve(), "other")
        counts[pkg] = counts.get(pkg, 0) + 1
    known = {pkg: PACKAGE_LICENCES[pkg] for pkg in counts if pkg in PACKAGE_LICENCES}
    summary = "; ".join(f"{pkg} ({counts[pkg]} images): {lic}" for pkg, lic in known.items())
    if counts.get("other"):
        summary += ("; " if summary else "") + f"{counts['other']} other images: their own licences apply"
    return {"summary": "filters learned without labels from: " + summary, "training_images_per_source": counts,
            "note": "the bundle holds filters and a PCA fitted on patches of these images, no image content"}


def build_patch_ckn(opts: PatchCKNOptions, train: ImageSet) -> tuple[Manifest, dict]:
    """Cut the training patches, fit the CKN (and PCA), export and write the bundle (+ report.json)."""
    t0 = time.perf_counter()
    keras.utils.set_random_seed(opts.seed)
    if opts.layers not in (1, 2):
        raise ConverterError(f"--layers {opts.layers}: allowed 1 (gradient map) or 2 (+ a fitted CKN layer)")
    if opts.patch_px < 16 or opts.patch_px % 8:
        raise ConverterError(f"--patch-px {opts.patch_px}: a multiple of 8, at least 16")
    if not train.images:
        raise ConverterError("no readable training images")
    patches = training_patches(train.images, opts.views_per_image, opts.patches_per_view, opts.patch_px,
                               opts.support, opts.seed)
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(patches))
    held = patches[order[:min(REPORT_PATCHES, len(patches) // 10)]]
    fit = patches[order[len(held):]]
    log.info("%d training patches (%d held back for the report)", len(fit), len(held))
    source: dict = {"descriptor": PATCH_DESCRIPTOR, "backbone": "patch_ckn", "input_type": "gradient",
                    "layers": opts.layers, "training_patches": int(len(fit)),
                    "patch": {"patch_px": opts.patch_px, "support": opts.support,
                              "cut": "at an ORB keypoint of the image local_features.downscaled gives: centred, "
                                     "support x the keypoint's size across, rotated by its angle, grayscale uint8"}}
    layer = None
    if opts.layers == 2:
        maps = _trunk(opts).predict(_as_input(fit), batch_size=512, verbose=0)
        sub = subpatches(maps, opts.subpatch, SUBPATCHES_PER_PATCH, rng)
        w, eta, sigma, facts = fit_ckn_layer(sub, opts.filters, pairs=opts.pairs, seed=opts.seed)
        layer = (w, eta, sigma)
        source["ckn_layer"] = {**facts, "subpatch": opts.subpatch}
    trunk = _trunk(opts, layer)
    pca = None
    if opts.pca_dim:
        flat = trunk.predict(_as_input(fit), batch_size=512, verbose=0).reshape(len(fit), -1)
        flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        kernel, bias, pinfo = fit_pca(flat, opts.pca_dim, whiten=False)
        pca = (kernel, bias)
        source["pca"] = pinfo
    model = _descriptor(trunk, pca)
    calibration = [_as_input(fit[i:i + 1]) for i in rng.permutation(len(fit))[:200]]
    tfl = to_tflite(model, opts.quantize, calibration)
    train_s = time.perf_counter() - t0
    source.update(tensorflow=tf.__version__, training_s=round(train_s, 1),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    dim = int(model.output.shape[-1])
    manifest = write_bundle(opts.out, tfl, Manifest(
        name=opts.name or opts.out.name,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        input=InputSpec(height=opts.patch_px, width=opts.patch_px, channels=1, color_order="GRAY",
                        dtype="uint8" if opts.quantize == "int8" else "float32",
                        graph_normalization="gray 0..255 in; the gradient map divides by 255"),
        output_dim=dim, quantization=opts.quantize, source=source, licence=training_licence(train),
        training_images={**train.manifest_entry(), "views_per_image": opts.views_per_image,
                         "patches_per_view": opts.patches_per_view},
    ))
    rep = _report(model, opts.out, held)
    rep.update(training_s=round(train_s, 1), peak_rss_mb=source["peak_rss_mb"])
    (opts.out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    return manifest, rep


def _report(model: keras.Model, bundle: Path, held: np.ndarray) -> dict:
    """Float Keras vs the exported bundle (through the device's PatchDescriber) on held-back patches."""
    ref = model.predict(_as_input(held), batch_size=512, verbose=0)
    dev = PatchDescriber(bundle).describe(held)
    cos = (ref * dev).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(dev, axis=1), 1e-12)
    nn_ref = np.argsort(-(ref @ ref.T), axis=1)[:, 1]
    nn_dev = np.argsort(-(dev @ dev.T), axis=1)[:, 1]
    return {"reference": "float Keras model", "patches": int(len(held)), "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "nearest_neighbour_agreement": round(float(np.mean(nn_ref == nn_dev)), 4),
            "size_bytes": (bundle / "encoder.tflite").stat().st_size}
