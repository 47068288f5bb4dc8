"""config.yaml is loaded once into a typed config; unknown keys and bad values are refused with the file,
the key and the allowed values."""
from __future__ import annotations

import pytest

from edge_retrieval.core.config import BUNDLES
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import ConfigError
from tests.conftest import ROOT


def write(tmp_path, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_the_documented_config_yaml_loads_and_resolves_paths():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg.encoder.bundle == BUNDLES / "sscd-distilled"  # a shipped bundle by its name
    assert cfg.encoder.fallback_bundle == BUNDLES / "efficientnet-lite0"
    assert cfg.index.path == ROOT / "var" / "catalog"
    assert cfg.catalog.demo is True and cfg.camera.source == "demo"


def test_bundle_names_keywords_and_paths_relative_to_the_config_file(tmp_path):
    cfg = load_config(write(tmp_path, "encoder:\n  bundle: efficientnet-lite0\n  fallback_bundle: null\n"
                                      "camera:\n  source: none\n"))
    assert cfg.encoder.bundle == BUNDLES / "efficientnet-lite0" and cfg.encoder.fallback_bundle is None
    assert cfg.camera.source == "none"  # a keyword, not <config dir>/none
    (tmp_path / "efficientnet-lite0").mkdir()  # a folder of that name beside the config wins over the shipped one
    cfg = load_config(write(tmp_path, "encoder:\n  bundle: efficientnet-lite0\n"))
    assert cfg.encoder.bundle == tmp_path / "efficientnet-lite0"
    cfg = load_config(write(tmp_path, "encoder:\n  bundle: bundles/mine\n"))
    assert cfg.encoder.bundle == tmp_path / "bundles" / "mine"


def test_a_config_less_start_has_no_camera_and_the_shipped_bundles():
    cfg = load_config(None)
    assert cfg.camera.source == "none" and cfg.catalog.demo is False
    assert cfg.encoder.bundle == BUNDLES / "sscd-distilled" and cfg.encoder.fallback_bundle == BUNDLES / "efficientnet-lite0"


def test_a_bundle_error_names_its_key(tmp_path):
    from edge_retrieval.core.errors import BundleError
    from edge_retrieval.model.encoder import load_encoder
    cfg = load_config(write(tmp_path, "encoder:\n  bundle: no-such-bundle\n"))
    with pytest.raises(BundleError, match=r"^encoder\.bundle: bundle .*no-such-bundle: not a directory"):
        load_encoder(cfg.encoder)


def test_every_setting_in_the_model_is_documented_in_config_yaml():
    import yaml

    from edge_retrieval.core.config import Config
    doc = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, model in Config.model_fields.items():
        if section == "source_file":
            continue
        assert section in doc, section
        sub = getattr(model.annotation, "model_fields", None)
        if sub:
            assert set(sub) == set(doc[section]), section


def test_unknown_key_is_refused_with_the_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "camera:\n  sorce: /dev/video0\n"))
    msg = str(e.value)
    assert "config.yaml" in msg and "camera.sorce" in msg and "source" in msg and "stall_timeout_s" in msg


def test_bad_values_name_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"web\.port.*65535"):
        load_config(write(tmp_path, "web:\n  port: 70000\n"))
    with pytest.raises(ConfigError, match=r"log_level.*'DEBUG'.*'INFO'"):
        load_config(write(tmp_path, "log_level: LOUD\n"))
    with pytest.raises(ConfigError, match=r"index\.top_k"):
        load_config(write(tmp_path, "index:\n  top_k: many\n"))


def test_bad_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml: line \d+, column \d+ not valid YAML"):
        load_config(write(tmp_path, "web:\n  port: [8080\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    cfg = load_config(write(tmp_path, "camera:\n  source: clips/door.avi\nindex:\n  path: data/idx\n"))
    assert cfg.index.path == tmp_path / "data" / "idx"
    assert cfg.camera.source == str(tmp_path / "clips" / "door.avi")
    cfg = load_config(write(tmp_path, "camera:\n  source: rtsp://cam/stream\n"))
    assert cfg.camera.source == "rtsp://cam/stream"


def test_a_key_that_moved_section_still_loads_from_an_older_config(tmp_path, caplog):
    """web.max_pixels became images.max_pixels (it bounds every decoder, not only uploads): an older
    config.yaml keeps its value, with a warning naming the new place; setting both is refused."""
    with caplog.at_level("WARNING", logger="edge_retrieval.core.config"):
        cfg = load_config(write(tmp_path, "web:\n  port: 8081\n  max_pixels: 2000000\n"))
    assert cfg.images.max_pixels == 2_000_000 and cfg.web.port == 8081
    assert "web.max_pixels is now images.max_pixels" in caplog.text
    with pytest.raises(ConfigError, match="set only the latter"):
        load_config(write(tmp_path, "web:\n  max_pixels: 2000000\nimages:\n  max_pixels: 3000000\n"))


def test_the_demo_names_the_extra_it_needs_when_scikit_image_is_missing(monkeypatch):
    import sys

    from edge_retrieval.imaging.shipped_photos import shipped_photos
    monkeypatch.setitem(sys.modules, "skimage", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ConfigError, match=r"edge-retrieval\[demo\]"):
        shipped_photos()


@pytest.mark.parametrize("token", ["short", "'1234567'", "[hunter2x]", "{a: hunter2x}"])
def test_a_bad_api_token_is_named_but_never_echoed(tmp_path, token):
    with pytest.raises(ConfigError, match=r"web\.api_token") as e:
        load_config(write(tmp_path, f"web:\n  api_token: {token}\n"))
    for secret in ("short", "1234567", "hunter2x"):
        assert secret not in str(e.value)
    assert "not shown" in str(e.value)
