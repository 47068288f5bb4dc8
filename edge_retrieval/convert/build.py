"""One build: backbone (or trained autoencoder) → descriptors of the training images → PCA(+whitening) baked
in as a dense layer → L2_NORMALIZATION → TFLite → bundle (+ quantization report)."""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from edge_retrieval.convert import report as report_mod
from edge_retrieval.convert.autoencoder import build_autoencoder, train_autoencoder
from edge_retrieval.convert.backbones import BackboneSpec, build_backbone
from edge_retrieval.convert.errors import ConverterError
from edge_retrieval.convert.export import to_tflite
from edge_retrieval.convert.images import ImageSet
from edge_retrieval.convert.layers import L2Normalize
from edge_retrieval.imaging.synthetic_views import VIEW_KINDS, camera_view
from edge_retrieval.model.bundle import InputSpec, Manifest, prepare_pixels, write_bundle

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    """Everything ``python -m edge_retrieval.convert build`` takes."""

    backbone: BackboneSpec
    out: Path
    quantize: str = "int8"
    pca_dim: int = 0                 # 0 = no PCA
    whiten: bool = False
    views_per_image: int = 4         # camera-like views of each training image (PCA, calibration)
    calibration_size: int = 200
    code_size: int = 32              # autoencoder only
    epochs: int = 20                 # autoencoder only
    denoise_std: float = 0.0         # autoencoder only: > 0 trains the denoising variant
    optimizer: str = "adam"          # autoencoder only
    clusters: int = 32               # pooling vlad only: k-means centroids
    vlad_local_dim: int = 128        # pooling vlad only: local PCA before VLAD (0 = every channel)
    name: str | None = None
    seed: int = 0
    extra_source: dict = field(default_factory=dict)


def training_views(images: list[np.ndarray], per_image: int, seed: int) -> list[np.ndarray]:
    """The images themselves plus ``per_image - 1`` camera-like views each (deterministic)."""
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        out.append(img)
        for _ in range(max(0, per_image - 1)):
            out.append(camera_view(img, VIEW_KINDS[int(rng.integers(len(VIEW_KINDS)))], rng, out_hw=(360, 480)))
    return out


def _pixels(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    return np.concatenate([prepare_pixels(img, spec) for img in images]).astype(np.float32)


def fit_pca(desc: np.ndarray, dim: int, whiten: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """PCA on L2-normalised descriptors → (kernel [D, dim], bias [dim]) of the equivalent dense layer."""
    from sklearn.decomposition import PCA
    n, d = desc.shape
    need = dim + 1
    if dim > d:
        raise ConverterError(f"--pca {dim} is larger than the descriptor ({d}-d); use --pca ≤ {d}")
    if n < need:
        raise ConverterError(f"--pca {dim} needs at least {need} training descriptors, got {n} "
                             f"(give more --train-images or raise --views-per-image)")
    pca = PCA(n_components=dim, whiten=whiten, random_state=0).fit(desc)
    kernel = pca.components_.T.astype(np.float64)
    if whiten:
        kernel = kernel / np.sqrt(pca.explained_variance_ + 1e-9)[None, :]
    bias = -pca.mean_ @ kernel
    info = {"pca_dim": dim, "whiten": whiten, "explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4),
            "fitted_on": n}
    return kernel.astype(np.float32), bias.astype(np.float32), info


def descriptor_model(base: keras.Model, pca: tuple[np.ndarray, np.ndarray] | None) -> keras.Model:
    """base → L2 → (PCA dense) → L2_NORMALIZATION."""
    x = L2Normalize(name="l2_pre")(base.output)
    if pca is not None:
        kernel, bias = pca
        dense = keras.layers.Dense(kernel.shape[1], name="pca")
        x = dense(x)
        dense.set_weights([kernel, bias])
    out = L2Normalize(name="l2")(x)
    return keras.Model(base.input, out, name="descriptor")


def build(opts: BuildOptions, train: ImageSet, heldout: ImageSet | None = None) -> tuple[Manifest, dict]:
    """Build the encoder, export it and write the bundle (with report.json). Returns (manifest, report)."""
    keras.utils.set_random_seed(opts.seed)
    b = opts.backbone
    if not train.images:
        raise ConverterError("no readable training images")
    size = b.input_size
    pix_spec = InputSpec(height=size, width=size, dtype="float32")
    views = training_views(train.images, opts.views_per_image, opts.seed)
    if b.name == "autoencoder":
        ae, base = build_autoencoder(size, opts.code_size)
        history = train_autoencoder(ae, _pixels(views, pix_spec), epochs=opts.epochs, denoise_std=opts.denoise_std,
                                    optimizer=opts.optimizer, seed=opts.seed)
        source = {"backbone": "autoencoder", "input_size": size, "code_size": opts.code_size,
                  "denoise_std": opts.denoise_std, "optimizer": opts.optimizer, "epochs_run": len(history["loss"]),
                  "final_loss": round(float(history["loss"][-1]), 6), "normalization": "x / 255"}
    else:
        base, source = build_backbone(b)
        if source.get("pooling") == "vlad":  # the backbone gave the conv map; the head is fitted on data
            from edge_retrieval.convert.vlad import fit_vlad_head
            base, vinfo = fit_vlad_head(base, _pixels(views, pix_spec), opts.clusters, opts.vlad_local_dim,
                                        seed=opts.seed)
            source.update(vinfo)
    source.update(opts.extra_source)
    pca = None
    if opts.pca_dim:
        log.info("descriptors of %d training views for PCA", len(views))
        desc = base.predict(_pixels(views, pix_spec), batch_size=16, verbose=0)
        desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        kernel, bias, pinfo = fit_pca(desc, opts.pca_dim, opts.whiten)
        pca = (kernel, bias)
        source.update(pinfo)
    model = descriptor_model(base, pca)
    rng = np.random.default_rng(opts.seed + 1)
    calib_idx = rng.permutation(len(views))[: opts.calibration_size]
    calibration = [prepare_pixels(views[i], pix_spec) for i in calib_idx]
    log.info("converting to TFLite (%s)", opts.quantize)
    tfl = to_tflite(model, opts.quantize, calibration)
    source.update(tensorflow=tf.__version__)
    dim = int(model.output.shape[-1])
    manifest = write_bundle(opts.out, tfl, Manifest(
        name=opts.name or opts.out.name,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        input=InputSpec(height=size, width=size, dtype="uint8" if opts.quantize == "int8" else "float32",
                        graph_normalization=source.get("normalization", "")),
        output_dim=dim,
        quantization=opts.quantize,
        source=source,
        training_images={**train.manifest_entry(), "views_per_image": opts.views_per_image,
                         "calibration_samples": len(calibration)},
    ))
    rep = report_mod.quantization_report(model, opts.out, heldout or train, seed=opts.seed)
    (opts.out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    return manifest, rep
