"""Model bundles: ``encoder.tflite`` + ``manifest.json``. The manifest is the contract between the converter
(which writes it) and the device (which refuses any bundle that does not honour it).

The pixel contract lives here, written once: the device and the converter both call ``prepare_pixels`` so
the Keras model that was calibrated and the TFLite model on the device see the same input.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import read_json_model
from .errors import BundleError

FORMAT_VERSION = 1
MODEL_FILE = "encoder.tflite"
MANIFEST_FILE = "manifest.json"
Quantization = Literal["float32", "float16", "dynamic", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


class _Strict(BaseModel):
    # strict: "224" is not a height; forbid: a misspelt key is an error, not a silent default
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputSpec(_Strict):
    """What the model's input tensor wants. ``mean``/``std`` are applied by the device *before* feeding
    (``(pixel - mean) / std``); bundles from our converter bake the real normalisation into the graph and
    leave mean 0 / std 1 here, recording the in-graph formula in ``graph_normalization``."""

    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)
    channels: Literal[3] = 3
    dtype: Literal["uint8", "float32"] = "uint8"
    color_order: Literal["RGB"] = "RGB"
    resize: Literal["stretch", "center_crop"] = "stretch"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    graph_normalization: str = ""

    @field_validator("std")
    @classmethod
    def _no_zero(cls, v):
        if any(x == 0 for x in v):
            raise ValueError("must not contain 0")
        return v


class Manifest(_Strict):
    """``manifest.json``: the contract between the converter (which builds one and writes it with
    :func:`write_bundle`) and the device (which validates one with :func:`load_manifest`). ``source`` and
    ``training_images`` are free-form records of how the bundle was made (backbone, pooling, PCA, images)."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str = ""
    created: str = ""
    input: InputSpec
    output_dim: int = Field(ge=1)
    quantization: Quantization
    metric: Literal["angular"] = "angular"
    model_file: str = MODEL_FILE
    sha256: str = Field("", pattern=r"^[0-9a-f]{64}$", description="of model_file; filled in by write_bundle")
    source: dict = Field(default_factory=dict)
    training_images: dict = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle_dir: str | Path, *, verify_sha: bool = True) -> Manifest:
    """Read and validate ``manifest.json`` of a bundle; with ``verify_sha`` also hash the model file.

    Raises BundleError naming the file and the field that is wrong."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir}: not a directory (a bundle is a folder with "
                          f"{MODEL_FILE} and {MANIFEST_FILE})")
    manifest = read_json_model(path, Manifest, BundleError, format_version=FORMAT_VERSION,
                               hint=f"a bundle is {MODEL_FILE} + {MANIFEST_FILE} from this version's converter")
    if not manifest.sha256:
        raise BundleError(f"{path}: missing field 'sha256'")
    if not manifest.name:
        manifest = manifest.model_copy(update={"name": bundle_dir.name})
    model_path = bundle_dir / manifest.model_file
    if not model_path.is_file():
        raise BundleError(f"{model_path}: missing (field 'model_file' of {path})")
    if verify_sha:
        actual = sha256_file(model_path)
        if actual != manifest.sha256:
            raise BundleError(f"{path}: field 'sha256' is {manifest.sha256[:12]}… but {model_path.name} "
                              f"hashes to {actual[:12]}… (corrupt or replaced model file)")
    return manifest


def write_bundle(bundle_dir: str | Path, tflite_bytes: bytes, manifest: Manifest) -> Manifest:
    """Write ``encoder.tflite`` and ``manifest.json`` (its sha256 filled in) and return the manifest as the
    device reads it back."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / MODEL_FILE).write_bytes(tflite_bytes)
    manifest = manifest.model_copy(update={"model_file": MODEL_FILE, "format_version": FORMAT_VERSION,
                                           "sha256": hashlib.sha256(tflite_bytes).hexdigest()})
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n",
                                            encoding="utf-8")
    return load_manifest(bundle_dir)


def resize_for_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 HxWx3 → RGB uint8 at the model's input size. ``stretch`` keeps the whole view;
    ``center_crop`` keeps the aspect ratio and drops the sides."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {rgb.dtype} {rgb.shape}")
    if spec.resize == "center_crop":
        h, w = rgb.shape[:2]
        target = spec.width / spec.height
        if w / h > target:
            cw = int(round(h * target))
            x0 = (w - cw) // 2
            rgb = rgb[:, x0:x0 + cw]
        else:
            ch = int(round(w / target))
            y0 = (h - ch) // 2
            rgb = rgb[y0:y0 + ch]
    h, w = rgb.shape[:2]
    if (h, w) == (spec.height, spec.width):
        return np.ascontiguousarray(rgb)
    # Box-filter by the integer part of the downscale factor (OpenCV's fast INTER_AREA path), then bilinear
    # for the rest (< 2×): anti-aliased like INTER_AREA at a fifth of its cost on camera frames.
    k = int(min(h / spec.height, w / spec.width))
    if k >= 2:
        rgb = cv2.resize(rgb, (w // k, h // k), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)


def needs_normalization(spec: InputSpec) -> bool:
    """True when the device must apply mean/std itself (the graph does not)."""
    return spec.mean != (0.0, 0.0, 0.0) or spec.std != (1.0, 1.0, 1.0)


def prepare_pixels(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 HxWx3 → the model's float input batch [1, H, W, 3] (pixel values normalised per the
    manifest's mean/std). The converter calibrates and fits PCA on exactly this."""
    x = resize_for_input(rgb, spec).astype(np.float32)
    if needs_normalization(spec):
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x[None]
