"""A corrupt or mismatched bundle is refused with a message naming the field; a good one loads."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_retrieval.core.errors import BundleError
from edge_retrieval.model.bundle import load_manifest
from edge_retrieval.model.encoder import Encoder
from tests.conftest import OPEN_BUNDLE


@pytest.fixture()
def bundle(tmp_path):
    d = tmp_path / "bundle"
    shutil.copytree(OPEN_BUNDLE, d)
    return d


def edit(bundle, fn):
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_default_bundle_loads_and_embeds_unit_vectors(encoder, photos):
    m = encoder.manifest
    assert m.quantization == "int8" and m.input.dtype == "uint8" and m.input.color_order == "RGB"
    v = encoder.embed(photos["astronaut"])
    assert v.shape == (m.output_dim,) and v.dtype == np.float32
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-4


@pytest.mark.parametrize("mutate, field", [
    (lambda m: m.pop("output_dim"), "output_dim"),
    (lambda m: m.update(format_version=99), "format_version"),
    (lambda m: m["input"].update(dtype="int16"), "dtype"),
    (lambda m: m["input"].update(color_order="BGR"), "color_order"),
    (lambda m: m.update(quantization="int4"), "quantization"),
    (lambda m: m["input"].update(height="224"), "height"),
    (lambda m: m["input"].update(std=[1, 0, 1]), "input.std"),
    (lambda m: m.update(sha256="0" * 64), "sha256"),
])
def test_bad_manifest_field_is_named(bundle, mutate, field):
    edit(bundle, mutate)
    with pytest.raises(BundleError, match=field):
        Encoder.from_bundle(bundle)


def test_manifest_that_disagrees_with_the_model_is_refused(bundle):
    real_dim = load_manifest(bundle).output_dim
    edit(bundle, lambda m: m.update(output_dim=real_dim // 2))
    with pytest.raises(BundleError, match=f"output_dim.*{real_dim // 2}.*{real_dim}"):
        Encoder.from_bundle(bundle)
    edit(bundle, lambda m: (m.update(output_dim=real_dim), m["input"].update(height=160, width=160)))
    with pytest.raises(BundleError, match="input.height/width"):
        Encoder.from_bundle(bundle)


def test_corrupt_model_file_is_refused_by_its_hash(bundle):
    data = bytearray((bundle / "encoder.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "encoder.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256.*corrupt"):
        load_manifest(bundle)


def test_garbage_model_with_matching_hash_is_refused_by_the_runtime(bundle):
    import hashlib
    (bundle / "encoder.tflite").write_bytes(b"not a flatbuffer at all")
    edit(bundle, lambda m: m.update(sha256=hashlib.sha256(b"not a flatbuffer at all").hexdigest()))
    with pytest.raises(BundleError, match="cannot load"):
        Encoder.from_bundle(bundle)


def test_missing_files_and_bad_json_are_named(bundle, tmp_path):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_manifest(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_manifest(bundle)
    with pytest.raises(BundleError, match="not a directory"):
        load_manifest(tmp_path / "nope")
