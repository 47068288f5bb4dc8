"""Bundles must load on tflite-runtime 2.14, the interpreter many Pi/Jetson images ship (numpy<2, Python ≤ 3.11),
and give the same descriptors as ai-edge-litert (what the device prefers).

tflite-runtime cannot live beside numpy 2, so it gets its own small virtualenv, cached between runs in
``~/.cache/edge-retrieval/tflite-rt-venv`` (override the folder with ``EDGE_RETRIEVAL_CACHE``). Inputs are
prepared here with the device's own ``Encoder.preprocess`` and handed over as an .npy file; a standalone
script (no project imports) runs them through tflite-runtime. If the runtime cannot be installed (no wheel
for this platform/Python, no network) the tests skip and say why."""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.core.config import OPEN_BUNDLE
from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
from edge_retrieval.model.encoder import Encoder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")
MIN_COSINE = 0.995
MIN_COSINE_INT8 = 0.975  # XNNPACK vs built-in int8 kernels (see the int8 test)

RUNNER = textwrap.dedent("""
    import sys
    import numpy as np
    from tflite_runtime.interpreter import Interpreter

    model, inputs, outputs = sys.argv[1:4]
    interp = Interpreter(model_path=model, num_threads=2)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    results = []
    for x in np.load(inputs):
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"]).astype(np.float32)
        scale, zero = out["quantization"]
        if out["dtype"] != np.float32:
            y = (y - zero) * scale
        results.append(y.reshape(-1))
    np.save(outputs, np.stack(results))
""")


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    p = shipped_photos()
    return [p[n] for n in PHOTO_NAMES if n in p]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _builtin_kernels(model: Path, inputs: np.ndarray) -> np.ndarray:
    """ai-edge-litert without its default XNNPACK delegate: the same reference kernels tflite-runtime runs."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    interp = Interpreter(model_path=str(model), num_threads=2,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    results = []
    for x in inputs:
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"]).astype(np.float32)
        scale, zero = out["quantization"]
        results.append(((y - zero) * scale if out["dtype"] != np.float32 else y).reshape(-1))
    return np.stack(results)


def _compare_runtimes(bundle: Path, python: Path, photos: list[np.ndarray], tmp_path: Path
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per photo, the cosine of tflite-runtime's output with (the device Encoder on ai-edge-litert, the same
    runtime's built-in kernels), all on the same input tensors."""
    with Encoder.from_bundle(bundle) as enc:
        assert enc.runtime == "ai-edge-litert"
        inputs = np.stack([enc.preprocess(img) for img in photos])
        ref = np.stack([enc.invoke(x) for x in inputs])
        model = bundle / enc.manifest.model_file
    (tmp_path / "run_tflite_runtime.py").write_text(RUNNER)
    np.save(tmp_path / "inputs.npy", inputs)
    r = subprocess.run([str(python), str(tmp_path / "run_tflite_runtime.py"), str(model),
                        str(tmp_path / "inputs.npy"), str(tmp_path / "outputs.npy")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"tflite-runtime 2.14 cannot run {model}:\n{r.stderr[-3000:]}"
    got = np.load(tmp_path / "outputs.npy")
    assert got.shape == ref.shape
    return _cos(ref, got), _cos(_builtin_kernels(model, inputs), got)


def test_default_int8_bundle_on_tflite_runtime(tflite_rt_python, photos, tmp_path):
    vs_encoder, vs_builtin = _compare_runtimes(OPEN_BUNDLE, tflite_rt_python, photos, tmp_path)
    # tflite-runtime computes exactly what ai-edge-litert's built-in int8 kernels compute ...
    assert (vs_builtin >= 0.9999).all(), dict(zip(PHOTO_NAMES, vs_builtin.round(5)))
    # ... while the XNNPACK int8 kernels the device Encoder runs by default round differently: measured
    # 0.993-0.998 with the PCA-128 default, 0.983-0.994 with the whitened PCA-256 default (whitening spreads
    # rounding differences), so a catalog indexed with one kernel set drifts slightly with the other. The
    # device builds its index with its own encoder, so both sides use the same kernels.
    assert (vs_encoder >= MIN_COSINE_INT8).all(), dict(zip(PHOTO_NAMES, vs_encoder.round(5)))


def test_dynamic_range_bundle_on_tflite_runtime(tflite_rt_python, photos, tmp_path):
    # TF 2.21 writes per-channel FULLY_CONNECTED v12 in dynamic-range models, which tflite-runtime 2.14
    # refuses; the converter turns that off for dense layers. The PCA dense layer is the one at stake.
    pytest.importorskip("tensorflow")
    from PIL import Image

    from edge_retrieval.convert.__main__ import main
    train = tmp_path / "train"
    train.mkdir()
    for name, img in list(photo_crops(shipped_photos(), per_photo=1, seed=5, size_px=128).items())[:8]:
        Image.fromarray(img).save(train / f"{name}.jpg", quality=90)
    out = tmp_path / "dynamic"
    # real (offline) weights, so the descriptors compared are meaningful rather than a vanishing random net
    rc = main(["build", "--backbone", "efficientnet_lite0", "--weights", "imagenet", "--input-size", "96",
               "--pca", "16", "--train-images", str(train), "--quantize", "dynamic", "--out", str(out)])
    assert rc == 0
    vs_encoder, vs_builtin = _compare_runtimes(out, tflite_rt_python, photos, tmp_path)
    assert (vs_encoder >= MIN_COSINE).all(), dict(zip(PHOTO_NAMES, vs_encoder.round(5)))
    assert (vs_builtin >= MIN_COSINE).all(), dict(zip(PHOTO_NAMES, vs_builtin.round(5)))
