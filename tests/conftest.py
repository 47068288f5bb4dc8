"""Shared fixtures: the committed default bundle, a catalog of real photos that ship in pip packages, and
simulated camera views of them (fixed seeds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device.images import encode_jpeg
from device.synthetic_views import camera_view
from device.config import OPEN_BUNDLE
from device.demo import shipped_photos

ROOT = Path(__file__).resolve().parent.parent
# Catalog photos for the device tests; "coffee" and "grace_hopper" stay out (not-in-catalog queries).
CATALOG = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
           "coins", "moon", "clock", "page", "brick", "china", "flower")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return shipped_photos()


@pytest.fixture(scope="session")
def encoder():
    from device.encoder import Encoder
    with Encoder.from_bundle(OPEN_BUNDLE, num_threads=2) as enc:
        yield enc


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory, photos) -> Path:
    """A folder of catalog JPEGs (one in a sub-folder, to check ids keep the relative path)."""
    d = tmp_path_factory.mktemp("catalog")
    for name in CATALOG:
        sub = d / "space" if name == "hubble_deep_field" else d
        sub.mkdir(exist_ok=True)
        (sub / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 92))
    return d


def view(photos, name: str, kind: str, seed: int) -> np.ndarray:
    """One deterministic camera view of a shipped photo."""
    return camera_view(photos[name], kind, np.random.default_rng(seed))


def appliance_config(tmp_path: Path, **sections):
    """The Config of a test appliance living in ``tmp_path`` (index, catalog store, history), with no camera, index
    builds in process, and ``sections`` (a section model each, or a dict of its fields) replacing the defaults."""
    from device.config import (BuildConfig, CameraConfig, CatalogConfig, Config, HistoryConfig, IndexConfig)
    base = {"index": IndexConfig(path=tmp_path / "index", search_k=2000),
            "catalog": CatalogConfig(store=tmp_path / "catalog.sqlite", enrolled_dir=tmp_path / "enrolled"),
            "history": HistoryConfig(dir=tmp_path / "history"), "camera": CameraConfig(source="none"),
            "build": BuildConfig(workers=1)}
    for name, value in sections.items():
        base[name] = base[name].model_copy(update=value) if isinstance(value, dict) else value
    return Config(**base)


def make_appliance(tmp_path: Path, encoder, folder: Path | None = None, **sections):
    """A test appliance built by the public wiring (device/wiring.py), not started; ``folder``: a catalog folder
    indexed first, as ``index build`` would."""
    from device.wiring import build_appliance, build_catalog
    cfg = appliance_config(tmp_path, **sections)
    if folder is not None:
        build_catalog(cfg, encoder, folder)
    return build_appliance(cfg, encoder)
