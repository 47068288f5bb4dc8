"""Model bundles: ``encoder.tflite`` + ``manifest.json``. The manifest is the contract between the converter
(which writes it) and the device (which refuses any bundle that does not honour it).

The pixel contract lives here, written once: the device and the converter both call ``prepare_pixels`` so
the Keras model that was calibrated and the TFLite model on the device see the same input.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .errors import BundleError

FORMAT_VERSION = 1
MODEL_FILE = "encoder.tflite"
MANIFEST_FILE = "manifest.json"
QUANTIZATIONS = ("float32", "dynamic", "int8", "float16")
INPUT_DTYPES = ("uint8", "float32")
RESIZE_MODES = ("stretch", "center_crop")


@dataclass(frozen=True)
class InputSpec:
    """What the model's input tensor wants. ``mean``/``std`` are applied by the device *before* feeding
    (``(pixel - mean) / std``); bundles from our converter bake the real normalisation into the graph and
    leave mean 0 / std 1 here, recording the in-graph formula in ``graph_normalization``."""

    height: int
    width: int
    channels: int = 3
    dtype: str = "uint8"
    color_order: str = "RGB"
    resize: str = "stretch"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    graph_normalization: str = ""


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``."""

    name: str
    input: InputSpec
    output_dim: int
    quantization: str
    sha256: str
    metric: str = "angular"
    format_version: int = FORMAT_VERSION
    model_file: str = MODEL_FILE
    source: dict = field(default_factory=dict)
    training_images: dict = field(default_factory=dict)
    created: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["input"] = asdict(self.input)
        d["input"]["mean"] = list(self.input.mean)
        d["input"]["std"] = list(self.input.std)
        return d


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _field(d: dict, key: str, kind, where: str, allowed=None):
    if key not in d:
        raise BundleError(f"{where}: missing field '{key}'")
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BundleError(f"{where}: field '{key}' must be {kind.__name__}, got {value!r}")
    if allowed is not None and value not in allowed:
        raise BundleError(f"{where}: field '{key}' is {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def _triple(d: dict, key: str, where: str) -> tuple[float, float, float]:
    value = d.get(key, [0.0, 0.0, 0.0] if key == "mean" else [1.0, 1.0, 1.0])
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise BundleError(f"{where}: field 'input.{key}' must be a list of 3 numbers, got {value!r}")
    if key == "std" and any(v == 0 for v in value):
        raise BundleError(f"{where}: field 'input.std' must not contain 0")
    return tuple(float(v) for v in value)


def load_manifest(bundle_dir: str | Path, *, verify_sha: bool = True) -> Manifest:
    """Read and validate ``manifest.json`` of a bundle; with ``verify_sha`` also hash the model file.

    Raises BundleError naming the file and the field that is wrong."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir}: not a directory (a bundle is a folder with "
                          f"{MODEL_FILE} and {MANIFEST_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (a bundle needs {MANIFEST_FILE} beside {MODEL_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: must hold a JSON object")
    where = str(path)
    version = _field(raw, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: field 'format_version' is {version}; this device reads "
                          f"{FORMAT_VERSION} (rebuild the bundle with this version's converter)")
    inp = _field(raw, "input", dict, where)
    iwhere = f"{where} [input]"
    spec = InputSpec(
        height=_field(inp, "height", int, iwhere),
        width=_field(inp, "width", int, iwhere),
        channels=_field(inp, "channels", int, iwhere, allowed=(3,)),
        dtype=_field(inp, "dtype", str, iwhere, allowed=INPUT_DTYPES),
        color_order=_field(inp, "color_order", str, iwhere, allowed=("RGB",)),
        resize=_field(inp, "resize", str, iwhere, allowed=RESIZE_MODES),
        mean=_triple(inp, "mean", where),
        std=_triple(inp, "std", where),
        graph_normalization=str(inp.get("graph_normalization", "")),
    )
    for key in ("height", "width"):
        if not 8 <= getattr(spec, key) <= 4096:
            raise BundleError(f"{iwhere}: field '{key}' is {getattr(spec, key)}; allowed 8..4096")
    manifest = Manifest(
        name=str(raw.get("name", bundle_dir.name)),
        input=spec,
        output_dim=_field(raw, "output_dim", int, where),
        quantization=_field(raw, "quantization", str, where, allowed=QUANTIZATIONS),
        sha256=_field(raw, "sha256", str, where),
        metric=_field(raw, "metric", str, where, allowed=("angular",)),
        format_version=version,
        model_file=str(raw.get("model_file", MODEL_FILE)),
        source=raw.get("source", {}) if isinstance(raw.get("source"), dict) else {},
        training_images=raw.get("training_images", {}) if isinstance(raw.get("training_images"), dict) else {},
        created=str(raw.get("created", "")),
    )
    if manifest.output_dim < 1:
        raise BundleError(f"{where}: field 'output_dim' must be ≥ 1, got {manifest.output_dim}")
    model_path = bundle_dir / manifest.model_file
    if not model_path.is_file():
        raise BundleError(f"{model_path}: missing (field 'model_file' of {where})")
    if verify_sha:
        actual = sha256_file(model_path)
        if actual != manifest.sha256:
            raise BundleError(f"{where}: field 'sha256' is {manifest.sha256[:12]}… but {model_path.name} "
                              f"hashes to {actual[:12]}… (corrupt or replaced model file)")
    return manifest


def write_bundle(bundle_dir: str | Path, tflite_bytes: bytes, manifest_fields: dict) -> Manifest:
    """Write ``encoder.tflite`` and ``manifest.json`` (sha256 filled in) and return the validated manifest."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / MODEL_FILE).write_bytes(tflite_bytes)
    fields = dict(manifest_fields)
    fields.update(format_version=FORMAT_VERSION, model_file=MODEL_FILE,
                  sha256=hashlib.sha256(tflite_bytes).hexdigest(), metric="angular")
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
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
