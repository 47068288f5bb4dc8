"""Shared fixtures: the committed default bundle, a catalog of real photos that ship in pip packages, and
simulated camera views of them (fixed seeds)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.core.config import OPEN_BUNDLE, RecognitionConfig, WebConfig
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.imaging.shipped_photos import shipped_photos
from edge_retrieval.imaging.synthetic_views import camera_view
from edge_retrieval.web import create_app
from tests.support.serve import TOKEN

ROOT = Path(__file__).resolve().parent.parent
# Catalog photos for the device tests; "coffee" and "grace_hopper" stay out (not-in-catalog queries).
CATALOG = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
           "coins", "moon", "clock", "page", "brick", "china", "flower")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return shipped_photos()


@pytest.fixture(scope="session")
def encoder():
    from edge_retrieval.model.encoder import Encoder
    with Encoder.from_bundle(OPEN_BUNDLE, num_threads=2) as enc:
        yield enc


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory, photos) -> Path:
    """A folder of catalog JPEGs (one in a sub-folder: an item of photos named by the folder, `space`)."""
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
    from edge_retrieval.core.config import BuildConfig, CameraConfig, CatalogConfig, Config, HistoryConfig, IndexConfig
    base = {"index": IndexConfig(path=tmp_path / "index", search_k=2000),
            "catalog": CatalogConfig(store=tmp_path / "catalog.sqlite", enrolled_dir=tmp_path / "enrolled"),
            "history": HistoryConfig(dir=tmp_path / "history"), "camera": CameraConfig(source="none"),
            "build": BuildConfig(workers=1)}
    for name, value in sections.items():
        base[name] = base[name].model_copy(update=value) if isinstance(value, dict) else value
    return Config(**base)


def make_appliance(tmp_path: Path, encoder, folder: Path | None = None, **sections):
    """A test appliance built by the public wiring (edge_retrieval/app/wiring.py), not started; ``folder``: a catalog folder
    indexed first, as ``index build`` would."""
    from edge_retrieval.app.wiring import build_appliance, build_catalog
    cfg = appliance_config(tmp_path, **sections)
    if folder is not None:
        build_catalog(cfg, encoder, folder)
    return build_appliance(cfg, encoder)


# Fast, predictable recognition for tests that are not about recognition: no adaptation, fixed thresholds.
FAST = RecognitionConfig(adapt=False, accept_inliers=16, accept_score=0.74, decision=None)


@pytest.fixture()
def appliance(tmp_path, catalog_dir, encoder):
    app = make_appliance(tmp_path, encoder, catalog_dir, recognition=FAST, index={"top_k": 3},
                         web=WebConfig(max_parallel_uploads=1)).start()
    yield app
    app.stop()


def web_client(app, **web):
    """A Flask test client of the appliance's web layer with the test token."""
    return create_app(WebConfig(api_token=TOKEN, **web), app).test_client()


@pytest.fixture()
def small_catalog(tmp_path, photos):
    d = tmp_path / "catalog"
    d.mkdir()
    for name in ("rocket", "moon", "brick"):
        (d / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 92))
    return d


@pytest.fixture
def waitress_server():
    """Start a real waitress server for an app on a free local port; closed after the test."""
    from waitress import create_server

    running = []

    def start(app, **adjustments):
        server = create_server(app, host="127.0.0.1", port=0, threads=4, **adjustments)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        return server.effective_port

    yield start
    for server, thread in running:
        # workers first (a finishing request still pulls the trigger), then close() from the
        # server's own loop thread so its select() never sees a closed socket; the loop then ends
        server.task_dispatcher.shutdown()
        server.trigger.pull_trigger(server.close)
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def tflite_rt_python():
    """The python of a cached virtualenv with only tflite-runtime 2.14 and numpy<2 (tests/support/tflite_runtime.py)."""
    from tests.support.tflite_runtime import tflite_runtime_python
    return tflite_runtime_python()


@pytest.fixture()
def tmpfs(tmp_path):
    """A real 20 MB tmpfs to fill (a full disk); skipped, with the reason, where one cannot be mounted."""
    import os
    import shutil
    import subprocess
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a tmpfs needs root and mount(8)")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a 20 MB tmpfs here: {out.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def device_config(root: Path, name: str, extra_catalog: str = "") -> Path:
    """A device's config file as a user writes it (efficientnet-lite0, no adaptation; state under var/ beside it);
    ``extra_catalog``: more lines of its catalog section."""
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text("encoder:\n  bundle: efficientnet-lite0\n  fallback_bundle: null\n"
                                   "index:\n  path: var/catalog\ncatalog:\n  store: var/catalog.sqlite\n"
                                   f"{extra_catalog}recognition:\n  adapt: false\n")
    return d / "config.yaml"

