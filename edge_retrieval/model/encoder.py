"""Bundle → runtime; preprocess (per manifest) → run → postprocess (L2).

Runtimes, chosen by the manifest's ``model_format``: TFLite bundles run on ai-edge-litert, then tflite-runtime
(what many Pi/Jetson images have), then tf.lite (only if TensorFlow happens to be installed; the device never
requires it); ONNX bundles on ONNX Runtime. ``load_encoder(config.encoder)`` falls back to
``encoder.fallback_bundle`` when the configured bundle's model package is not installed, and says so.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from edge_retrieval.core.config import EncoderConfig
from edge_retrieval.core.errors import BundleError, BundleUnavailable
from edge_retrieval.core.status import BundleInfo
from edge_retrieval.model.bundle import (
    PATCH_DESCRIPTOR,
    Manifest,
    load_manifest,
    model_path,
    needs_normalization,
    prepare_pixels,
    resize_for_input,
)

log = logging.getLogger(__name__)


def interpreter_class():
    """Return (Interpreter class, runtime name) of the first TFLite interpreter that imports."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"
    except ImportError:
        pass
    try:  # last resort on a workstation; importing TensorFlow costs ~700 MB of RSS
        import importlib
        tf = importlib.import_module("tensorflow")
        return tf.lite.Interpreter, "tf.lite"
    except ImportError:
        raise BundleError("no TFLite interpreter: install ai-edge-litert (or tflite-runtime)") from None


class _TFLiteModel:
    """A TFLite interpreter: one fixed input size; quantized inputs/outputs converted here."""

    batches = False  # the input tensor is [1, H, W, 3]: crops run one call each

    def __init__(self, path: Path, manifest: Manifest, num_threads: int, where: Path):
        Interpreter, self.runtime = interpreter_class()
        try:
            interp = Interpreter(model_path=str(path), num_threads=num_threads)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            interp = self._without_xnnpack(Interpreter, str(path), num_threads)
            if interp is None:
                raise BundleError(f"{path}: {self.runtime} cannot load it ({e})") from None
            log.warning("%s: XNNPACK could not prepare the model (%s); using the built-in kernels", path, e)
            self.runtime += " (no XNNPACK)"
        self._interp = interp
        inp = interp.get_input_details()[0]
        out = interp.get_output_details()[0]
        self._in_index, self._out_index = inp["index"], out["index"]
        self.in_dtype = np.dtype(inp["dtype"])
        self._in_scale, self._in_zero = inp.get("quantization", (0.0, 0))
        self._out_dtype = np.dtype(out["dtype"])
        self._out_scale, self._out_zero = out.get("quantization", (0.0, 0))
        spec = manifest.input
        # Raw camera pixels can go straight in when the graph normalises and the input is uint8 with
        # scale 1 / zero point 0 (our int8 bundles): no float round trip on the hot path.
        self.raw_uint8 = (self.in_dtype == np.uint8 and not needs_normalization(spec)
                          and abs(self._in_scale - 1.0) < 1e-6 and self._in_zero == 0)
        shape = tuple(int(v) for v in inp["shape"])
        want = (1, spec.height, spec.width, spec.channels)
        if shape != want:
            raise BundleError(f"{where}: fields 'input.height/width/channels' say {want[1:]} but the model "
                              f"input is {shape[1:]}")
        self.out_dim = int(np.prod(out["shape"][1:]))

    @staticmethod
    def _without_xnnpack(Interpreter, model_path: str, num_threads: int):
        """A second try with the built-in kernels only (XNNPACK refuses a few valid models)."""
        try:
            from ai_edge_litert.interpreter import OpResolverType
        except ImportError:
            return None
        try:
            interp = Interpreter(model_path=model_path, num_threads=num_threads,
                                 experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            interp.allocate_tensors()
            return interp
        except (ValueError, RuntimeError, TypeError):
            return None

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """A float input batch → the model's input dtype."""
        if self.in_dtype == np.float32:
            return x
        info = np.iinfo(self.in_dtype)
        q = np.round(x / self._in_scale + self._in_zero)
        return np.clip(q, info.min, info.max).astype(self.in_dtype)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        self._interp.set_tensor(self._in_index, tensor)
        self._interp.invoke()
        out = self._interp.get_tensor(self._out_index).copy()
        if self._out_dtype != np.float32:
            out = (out.astype(np.float32) - self._out_zero) * self._out_scale
        return out


class _OnnxModel:
    """An ONNX Runtime session (CPU). Inputs of any size are allowed where the model's axes are dynamic."""

    runtime = "onnxruntime"
    batches = True  # where the batch axis is dynamic (set from the model): several crops run in one call

    def __init__(self, path: Path, manifest: Manifest, num_threads: int, where: Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleUnavailable(f"{where}: field 'model_format' is 'onnx' but onnxruntime is not installed "
                                    "(pip install onnxruntime)") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between lookups: on a Pi the spinning threads would take the cores ORB needs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for a corrupt or unsupported file
            raise BundleError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        self.runtime = f"onnxruntime {ort.__version__}"
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise BundleError(f"{where}: the ONNX model has {len(inputs)} inputs; a bundle model takes one image batch")
        inp, out = inputs[0], outputs[0]
        self._in_name, self._out_name = inp.name, out.name
        self.in_dtype = np.dtype({"tensor(uint8)": np.uint8, "tensor(float)": np.float32}.get(inp.type, np.void))
        spec = manifest.input
        shape = list(inp.shape)
        if len(shape) != 4 or (isinstance(shape[3], int) and shape[3] != spec.channels):  # named axes are dynamic
            raise BundleError(f"{where}: field 'input.channels' says [batch, H, W, {spec.channels}] but the model "
                              f"input is {shape}")
        self.batches = not isinstance(shape[0], int)  # a named batch axis is dynamic
        fixed = [d if isinstance(d, int) else None for d in shape[1:3]]
        if spec.resize == "short_side" and any(fixed):
            raise BundleError(f"{where}: field 'input.resize' is 'short_side' but the model input has a fixed size "
                              f"{shape[1:3]}")
        if spec.resize != "short_side" and all(fixed) and fixed != [spec.height, spec.width]:
            raise BundleError(f"{where}: fields 'input.height/width' say {(spec.height, spec.width)} but the model "
                              f"input is {tuple(fixed)}")
        self.raw_uint8 = self.in_dtype == np.uint8 and not needs_normalization(spec)
        if self.in_dtype == np.uint8 and not self.raw_uint8:
            raise BundleError(f"{where}: fields 'input.mean/std' ask for normalised pixels but the model takes uint8")
        dim = out.shape[-1] if out.shape else None
        self.out_dim = dim if isinstance(dim, int) else manifest.output_dim

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return x

    def run(self, tensor: np.ndarray) -> np.ndarray:
        return self._session.run([self._out_name], {self._in_name: tensor})[0]


class Encoder:
    """A loaded bundle. ``embed(rgb_uint8) -> float32[output_dim]`` (L2-normalised). Thread-safe: one
    interpreter or session, runs serialised by a lock (a second one per thread would double RSS).
    ``fallback_reason`` says why this is not the configured bundle (empty when it is)."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, model, num_threads: int, fallback_reason: str = ""):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.runtime = model.runtime
        self.num_threads = num_threads
        self.fallback_reason = fallback_reason
        self._model = model
        self._lock = threading.Lock()
        where = bundle_dir / "manifest.json"
        if model.in_dtype.name != manifest.input.dtype:
            raise BundleError(f"{where}: field 'input.dtype' is {manifest.input.dtype!r} but the model input is "
                              f"{model.in_dtype.name}")
        if model.out_dim != manifest.output_dim:
            raise BundleError(f"{where}: field 'output_dim' is {manifest.output_dim} but the model "
                              f"outputs {model.out_dim} values")

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *,
                    num_threads: int = EncoderConfig.model_fields["num_threads"].default) -> Encoder:
        """Load and verify a bundle (manifest fields, sha256, tensor shapes) and create its runtime."""
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir)
        if manifest.source.get("descriptor") == PATCH_DESCRIPTOR or manifest.input.channels != 3:
            raise BundleError(f"{bundle_dir / 'manifest.json'}: field 'source.descriptor' is {PATCH_DESCRIPTOR!r}: "
                              "a patch descriptor for keypoints (edge_retrieval/model/patch_descriptors.py), not "
                              "an image encoder for encoder.bundle")
        path = model_path(bundle_dir, manifest)
        runtime = _OnnxModel if manifest.model_format == "onnx" else _TFLiteModel
        enc = cls(bundle_dir, manifest, runtime(path, manifest, num_threads, bundle_dir / "manifest.json"), num_threads)
        log.info("encoder %s: %s %s %s, input %s → %d-d, runtime %s, %d threads", manifest.name,
                 manifest.source.get("backbone", "?"), manifest.model_format, manifest.quantization,
                 manifest.input.describe(), manifest.output_dim, enc.runtime, num_threads)
        return enc

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 → the input tensor [1, H, W, 3] in the model's dtype."""
        return self._prepare(rgb, self.manifest.input)

    def _prepare(self, rgb: np.ndarray, spec) -> np.ndarray:
        if self._model.raw_uint8:
            return resize_for_input(rgb, spec)[None]
        return self._model.quantize(prepare_pixels(rgb, spec))

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """Run the model on a prepared input tensor; returns the raw output as float32 (dequantized)."""
        with self._lock:
            out = self._model.run(tensor)
        return out.reshape(-1).astype(np.float32, copy=False)

    @staticmethod
    def postprocess(raw: np.ndarray) -> np.ndarray:
        """L2-normalise again on the device: quantized graphs can drift off the unit sphere."""
        norm = float(np.linalg.norm(raw))
        if not np.isfinite(norm) or norm == 0.0:
            return np.zeros_like(raw)
        return raw / norm

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 → L2-normalised float32 descriptor of ``manifest.output_dim`` values."""
        return self.postprocess(self.invoke(self.preprocess(rgb)))

    def embed_batch(self, images: list[np.ndarray], *, short_side_px: int | None = None) -> list[np.ndarray]:
        """Several RGB frames (crops of one frame) → their descriptors, as :meth:`embed` gives them. Where the
        runtime takes a batch and the prepared tensors share one size, they run in ONE call (one lock, one
        dispatch); otherwise one call each. ``short_side_px``: a model that takes any input size (``resize:
        short_side``) sees each image at this short side instead of the manifest's (a quarter of the frame at
        half the side keeps the frame's pixel density at a quarter of the cost); ignored by fixed-size models."""
        spec = self.manifest.input
        if short_side_px is not None and spec.resize == "short_side" and short_side_px < spec.short_side:
            spec = spec.model_copy(update={"short_side": int(short_side_px)})
        tensors = [self._prepare(rgb, spec) for rgb in images]
        if len(tensors) > 1 and self._model.batches and len({t.shape for t in tensors}) == 1:
            with self._lock:
                out = self._model.run(np.concatenate(tensors, axis=0))
            rows = np.asarray(out, dtype=np.float32).reshape(len(tensors), -1)
            return [self.postprocess(row) for row in rows]
        return [self.postprocess(self.invoke(t)) for t in tensors]

    @property
    def dim(self) -> int:
        return self.manifest.output_dim

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    def info(self) -> BundleInfo:
        """Bundle facts for health pages and logs."""
        m = self.manifest
        return BundleInfo(name=m.name, path=str(self.bundle_dir), sha256=m.sha256, quantization=m.quantization,
                          backbone=m.source.get("backbone"), output_dim=m.output_dim, format=m.model_format,
                          input=m.input.describe(), runtime=self.runtime, num_threads=self.num_threads,
                          licence=m.licence.get("summary", ""), fallback_reason=self.fallback_reason)

    def close(self) -> None:
        """Drop the interpreter or session."""
        self._model = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_encoder(config: EncoderConfig) -> Encoder:
    """The encoder of ``config.bundle``; when that bundle's model package is not installed and
    ``config.fallback_bundle`` is set, the fallback's (also when onnxruntime is missing), with a warning saying which and why (also in
    ``Encoder.fallback_reason`` → /api/health). Every other bundle problem is raised as it is."""
    try:
        return Encoder.from_bundle(config.bundle, num_threads=config.num_threads)
    except BundleUnavailable as e:
        if config.fallback_bundle is None or Path(config.fallback_bundle).resolve() == Path(config.bundle).resolve():
            raise type(e)(f"encoder.bundle: {e}") from None
        why = f"bundle {Path(config.bundle).name} unavailable: {e}"
        log.warning("%s; using encoder.fallback_bundle %s instead", why, config.fallback_bundle)
    except BundleError as e:
        raise type(e)(f"encoder.bundle: {e}") from None
    try:
        enc = Encoder.from_bundle(config.fallback_bundle, num_threads=config.num_threads)
    except BundleError as e:
        raise type(e)(f"encoder.fallback_bundle: {e}") from None
    enc.fallback_reason = why
    return enc
