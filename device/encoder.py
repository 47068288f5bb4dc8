"""Bundle → TFLite interpreter; preprocess (per manifest) → invoke → postprocess (L2).

Interpreter preference: ai-edge-litert, then tflite-runtime (what many Pi/Jetson images have), then
tf.lite (only if TensorFlow happens to be installed; the device never requires it).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from .bundle import Manifest, load_manifest, needs_normalization, prepare_pixels, resize_for_input
from .config import EncoderConfig
from .errors import BundleError

log = logging.getLogger(__name__)


def _interpreter_class():
    """Return (Interpreter class, runtime name) of the first interpreter that imports."""
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


class Encoder:
    """A loaded bundle. ``embed(rgb_uint8) -> float32[output_dim]`` (L2-normalised). Thread-safe: one
    interpreter, invocations serialised by a lock (a second interpreter per thread would double RSS)."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, interpreter, runtime: str, num_threads: int):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.runtime = runtime
        self.num_threads = num_threads
        self._interp = interpreter
        self._lock = threading.Lock()
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
        self._in_index = inp["index"]
        self._out_index = out["index"]
        self._in_dtype = np.dtype(inp["dtype"])
        self._in_scale, self._in_zero = inp.get("quantization", (0.0, 0))
        self._out_dtype = np.dtype(out["dtype"])
        self._out_scale, self._out_zero = out.get("quantization", (0.0, 0))
        spec = manifest.input
        # Raw camera pixels can go straight in when the graph normalises and the input is uint8 with
        # scale 1 / zero point 0 (our int8 bundles): no float round trip on the hot path.
        self._raw_uint8 = (self._in_dtype == np.uint8 and not needs_normalization(spec)
                           and abs(self._in_scale - 1.0) < 1e-6 and self._in_zero == 0)
        self._check_shapes(inp, out)

    def _check_shapes(self, inp: dict, out: dict) -> None:
        spec, where = self.manifest.input, self.bundle_dir / "manifest.json"
        shape = tuple(int(v) for v in inp["shape"])
        want = (1, spec.height, spec.width, spec.channels)
        if shape != want:
            raise BundleError(f"{where}: fields 'input.height/width/channels' say {want[1:]} but the model "
                              f"input is {shape[1:]}")
        if self._in_dtype.name != spec.dtype:
            raise BundleError(f"{where}: field 'input.dtype' is {spec.dtype!r} but the model input is "
                              f"{self._in_dtype.name}")
        out_dim = int(np.prod(out["shape"][1:]))
        if out_dim != self.manifest.output_dim:
            raise BundleError(f"{where}: field 'output_dim' is {self.manifest.output_dim} but the model "
                              f"outputs {out_dim} values")

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *,
                    num_threads: int = EncoderConfig.model_fields["num_threads"].default) -> "Encoder":
        """Load and verify a bundle (manifest fields, sha256, tensor shapes) and create its interpreter."""
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir)
        Interpreter, runtime = _interpreter_class()
        model_path = str(bundle_dir / manifest.model_file)
        try:
            interp = Interpreter(model_path=model_path, num_threads=num_threads)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            interp = cls._without_xnnpack(Interpreter, model_path, num_threads)
            if interp is None:
                raise BundleError(f"{model_path}: {runtime} cannot load it ({e})") from None
            log.warning("%s: XNNPACK could not prepare the model (%s); using the built-in kernels", model_path, e)
            runtime += " (no XNNPACK)"
        enc = cls(bundle_dir, manifest, interp, runtime, num_threads)
        log.info("encoder %s: %s %s, %dx%d → %d-d, runtime %s, %d threads", manifest.name,
                 manifest.source.get("backbone", "?"), manifest.quantization, manifest.input.width,
                 manifest.input.height, manifest.output_dim, runtime, num_threads)
        return enc

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

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 → the input tensor [1, H, W, 3] in the model's dtype."""
        spec = self.manifest.input
        if self._raw_uint8:
            return resize_for_input(rgb, spec)[None]
        x = prepare_pixels(rgb, spec)
        if self._in_dtype == np.float32:
            return x
        info = np.iinfo(self._in_dtype)
        q = np.round(x / self._in_scale + self._in_zero)
        return np.clip(q, info.min, info.max).astype(self._in_dtype)

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """Run the model on a prepared input tensor; returns the raw output as float32 (dequantized)."""
        with self._lock:
            self._interp.set_tensor(self._in_index, tensor)
            self._interp.invoke()
            out = self._interp.get_tensor(self._out_index).copy()
        if self._out_dtype != np.float32:
            out = (out.astype(np.float32) - self._out_zero) * self._out_scale
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

    @property
    def dim(self) -> int:
        return self.manifest.output_dim

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    def info(self) -> dict:
        """Bundle facts for health pages and logs."""
        m = self.manifest
        return {"name": m.name, "path": str(self.bundle_dir), "sha256": m.sha256, "quantization": m.quantization,
                "backbone": m.source.get("backbone"), "output_dim": m.output_dim,
                "input": f"{m.input.width}x{m.input.height} {m.input.dtype}", "runtime": self.runtime,
                "num_threads": self.num_threads}

    def close(self) -> None:
        """Drop the interpreter."""
        self._interp = None

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
