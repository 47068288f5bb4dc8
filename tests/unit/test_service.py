"""The running appliance as `serve` wires it (edge_retrieval/app/wiring.py), with real parts: a fake camera (video file of simulated views) drives the trigger
and produces lookups; the HTTP API on the real Appliance (upload, enrol, remove, health, metrics)."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from edge_retrieval.capture.sources import VideoWriter
from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.core.config import CameraConfig, ImagesConfig, RecognitionConfig, TriggerConfig, WebConfig
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.web import create_app
from tests.conftest import make_appliance, view

# The fixtures here test HTTP and durability, not recognition: no catalog adaptation (it fits a projection on
# synthetic views at every index build), with the decision thresholds calibrated for unadapted cosines.
FAST = RecognitionConfig(adapt=False, accept_inliers=16, accept_score=0.74, decision=None)

TOKEN = "s3cret-token"


@pytest.fixture()
def built(tmp_path, catalog_dir, encoder):
    """The catalog folder indexed at tmp_path/index."""
    build_index(catalog_dir, ItemMaker(encoder, FAST, 160), tmp_path / "index", n_trees=10, progress=False)


def appliance_on(encoder, tmp_path, camera: CameraConfig | None = None, trigger: TriggerConfig | None = None,
                 **sections):
    """The appliance `serve` wires (edge_retrieval/app/wiring.py) over that index: with ``camera`` (else none), with the
    ``trigger`` (else lookups only when asked)."""
    return make_appliance(tmp_path, encoder, recognition=FAST, index={"top_k": 3},
                          camera=camera or CameraConfig(source="none"),
                          trigger=trigger or TriggerConfig(enabled=False), **sections)


def test_fake_camera_drives_the_trigger_to_a_correct_lookup(encoder, built, photos, tmp_path):
    rng = np.random.default_rng(3)
    shown = view(photos, "rocket", "perspective", seed=11)
    h, w = shown.shape[:2]
    path = tmp_path / "camera.avi"
    with VideoWriter(path, 20, (w, h)) as wr:
        for i in range(10):  # something moving through the view...
            wr.write(np.roll(shown, i * 60, axis=1))
        for _ in range(30):  # ...then held still for 1.5 s
            wr.write(np.clip(shown.astype(np.int16) + rng.integers(-2, 3, shown.shape), 0, 255).astype(np.uint8))
    app = appliance_on(encoder, tmp_path, camera=CameraConfig(source=str(path), fps=20, loop=False, stall_timeout_s=5),
                       trigger=TriggerConfig(still_time_s=0.3, min_interval_s=0.5)).start()
    try:
        deadline = time.time() + 10
        while app.latest_result() is None and time.time() < deadline:
            time.sleep(0.05)
        result = app.latest_result()
        assert result is not None, "the trigger never fired"
        assert result.source == "camera" and result.results[0].id == "rocket"
        assert app.metrics.value("appliance_lookups_total", source="camera") >= 1
        assert app.latest_frame_jpeg()[1][:2] == b"\xff\xd8"
    finally:
        app.stop()


def test_health_reports_a_lost_camera_and_the_device_keeps_serving(encoder, built, photos, tmp_path):
    cam = CameraConfig(source=str(tmp_path / "unplugged.avi"), stall_timeout_s=0.2, backoff_initial_s=0.05,
                       backoff_max_s=0.1)
    app = appliance_on(encoder, tmp_path, camera=cam, trigger=TriggerConfig()).start()
    client = create_app(WebConfig(), app).test_client()
    try:
        time.sleep(0.5)
        health = client.get("/api/health")
        assert health.status_code == 503
        body = health.get_json()
        assert body["camera"]["state"] == "reconnecting" and "unplugged.avi" in body["camera"]["last_error"]
        assert body["index"]["size"] > 0 and body["bundle"]["quantization"] == "int8"
        # uploads still work while the camera is gone
        up = client.post("/api/query", data={"image": (io.BytesIO(encode_jpeg(photos["chelsea"])), "q.jpg")})
        assert up.status_code == 200 and up.get_json()["results"][0]["id"] == "chelsea"
    finally:
        app.stop()


def test_http_upload_enrol_and_remove_on_the_real_appliance(encoder, built, photos, tmp_path):
    app = appliance_on(encoder, tmp_path).start()
    client = create_app(WebConfig(api_token=TOKEN), app).test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    q = encode_jpeg(view(photos, "coffee", "rotate", seed=2))

    r = client.post("/api/query", data={"image": (io.BytesIO(q), "q.jpg")})
    assert r.status_code == 200
    body = r.get_json()
    assert body["results"][0]["id"] != "mug" and set(body["timings_ms"]) >= {"decode", "encode", "search"}

    r = client.post("/api/catalog", headers=auth,
                    data={"image": (io.BytesIO(encode_jpeg(photos["coffee"], 92)), "c.jpg"), "label": "Mug", "id": "mug"})
    assert r.status_code in (201, 202) and r.get_json()["id"] == "mug"
    deadline = time.time() + 20
    while not app.catalog.holder.current().has("mug") and time.time() < deadline:
        time.sleep(0.05)
    assert app.catalog.store.get("mug").image[:2] == b"\xff\xd8"  # the original is kept: nothing is lost
    assert client.get("/api/catalog/mug/thumb.jpg").data[:2] == b"\xff\xd8"
    r = client.post("/api/query", data={"image": (io.BytesIO(q), "q.jpg")})
    assert r.get_json()["results"][0]["id"] == "mug"

    assert client.delete("/api/catalog/mug", headers=auth).status_code == 200
    assert not app.catalog.holder.current().has("mug") and app.catalog.store.get("mug").removed
    assert client.delete("/api/catalog/mug", headers=auth).status_code == 404


@pytest.mark.parametrize("payload, status, words", [
    (b"hello, I am text", 400, "not an image"),
    (None, 400, "truncated"),
])
def test_bad_uploads_get_a_clear_4xx_and_lose_nothing(encoder, built, photos, tmp_path, payload, status, words):
    app = appliance_on(encoder, tmp_path)
    client = create_app(WebConfig(), app).test_client()
    if payload is None:
        payload = encode_jpeg(photos["astronaut"])[:3000]
    r = client.post("/api/query", data={"image": (io.BytesIO(payload), "x.jpg")})
    assert r.status_code == status and words in r.get_json()["error"]
    ok = client.post("/api/query", data={"image": (io.BytesIO(encode_jpeg(photos["moon"])), "m.jpg")})
    assert ok.status_code == 200 and ok.get_json()["results"][0]["id"] == "moon"
    assert app.metrics.value("appliance_errors_total", kind="ImageError") == 1
    # the visitor was told; the device's status panel does not show a visitor's bad photo as its own last error
    assert client.get("/api/status").get_json()["last_error"] is None


def test_huge_image_is_refused_before_decoding(encoder, built, tmp_path):
    from PIL import Image
    app = appliance_on(encoder, tmp_path, images=ImagesConfig(max_pixels=1_000_000))
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000), (10, 20, 30)).save(buf, format="PNG")
    client = create_app(WebConfig(), app).test_client()
    r = client.post("/api/query", data={"image": (io.BytesIO(buf.getvalue()), "big.png")})
    assert r.status_code in (400, 413) and "limit" in r.get_json()["error"]


def test_a_crashing_lookup_does_not_stop_the_camera_loop(encoder, built, photos, tmp_path):
    shown = view(photos, "chelsea", "closeup", seed=4)
    h, w = shown.shape[:2]
    path = tmp_path / "camera.avi"
    with VideoWriter(path, 20, (w, h)) as wr:
        for _ in range(60):
            wr.write(shown)
    app = appliance_on(encoder, tmp_path, camera=CameraConfig(source=str(path), fps=20, loop=True)).start()
    real, calls = app.lookup.lookup_rgb, []

    def flaky(rgb, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated bug")
        return real(rgb, **kw)
    app.lookup.lookup_rgb = flaky
    try:
        app.request_lookup()
        deadline = time.time() + 5
        while len(calls) < 1 and time.time() < deadline:
            time.sleep(0.02)
        app.request_lookup()
        while app.latest_result() is None and time.time() < deadline:
            time.sleep(0.02)
        assert app.latest_result() is not None and app.latest_result().results[0].id == "chelsea"
        assert app.metrics.value("appliance_errors_total", kind="internal") == 1
    finally:
        app.stop()


def test_start_rebuilds_an_index_of_another_bundle_and_keeps_enrolled_items(encoder, catalog_dir, photos, tmp_path):
    """After a bundle update the old index is refused for queries; with a catalog folder configured, the
    start rebuilds it from that folder, and the replay of the catalog store re-enrols what was enrolled (with
    its label) and keeps removals out."""
    from edge_retrieval.app.wiring import catalog_service, prepare_catalog
    from edge_retrieval.catalog.store import CatalogStore
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.index.reader import CatalogIndex, CatalogItem
    from edge_retrieval.index.writer import write_index
    from tests.conftest import OPEN_BUNDLE
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"camera:\n  source: /dev/video9\nencoder:\n  bundle: {OPEN_BUNDLE}\n"
                        f"index:\n  path: {tmp_path / 'index'}\n"
                        f"catalog:\n  build_from: {catalog_dir}\n  store: {tmp_path / 'catalog.sqlite'}\n")
    cfg = load_config(cfg_file)
    write_index(tmp_path / "index", [CatalogItem("old", "old", np.ones(8, np.float32))], bundle_sha256="0" * 64,
                n_trees=2)
    store = CatalogStore(cfg.catalog.store)
    store.put("kitchen/mug", "Coffee mug", encode_jpeg(photos["coffee"]))
    store.remove("moon")  # removed over HTTP earlier: a rebuild from the folder must not bring it back
    store.close()
    prepare_catalog(cfg, encoder)
    catalog = catalog_service(cfg, encoder)
    rep = catalog.apply()
    assert rep.enrolled == ["kitchen/mug"] and rep.removed == ["moon"] and rep.skipped == []
    idx = catalog.holder.current()
    assert idx.has("rocket") and not idx.has("old") and not idx.has("moon")
    assert idx.item("kitchen/mug").label == "Coffee mug"
    gen = idx.generation
    prepare_catalog(cfg, encoder)  # same bundle now: nothing is rebuilt, and nothing is left to replay
    assert catalog.apply().enrolled == []
    assert CatalogIndex.load(tmp_path / "index", expected_bundle_sha256=encoder.sha256).generation == gen
    catalog.stop()


def test_a_generation_made_live_by_another_process_is_picked_up_and_reconciled(encoder, built, photos, tmp_path,
                                                                                 monkeypatch):
    """A generation shipped to a fleet device (or built by the CLI) is served without a restart, the items
    enrolled on this device come back into it, and one built with another bundle is refused while the old keeps
    serving."""
    import edge_retrieval.catalog.service as service_mod
    from edge_retrieval.index.reader import CatalogItem
    from edge_retrieval.index.writer import write_index
    monkeypatch.setattr(service_mod, "WATCH_S", 0.2)
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "0.jpg").write_bytes(encode_jpeg(photos["moon"]))
    app = appliance_on(encoder, tmp_path, camera=CameraConfig(source=str(frames), fps=5))
    app.catalog.store.put("kitchen/mug", "Mug", encode_jpeg(photos["coffee"]))
    app.start()
    try:
        maker = ItemMaker(encoder, FAST, 160)
        shipped = write_index(app.catalog.holder.path, [maker.make(photos[n], n) for n in ("rocket", "brick")],
                              bundle_sha256=encoder.sha256, n_trees=10, dim=encoder.dim)
        deadline = time.monotonic() + 20
        while (app.catalog.holder.current().has("astronaut") or not app.catalog.holder.current().has("kitchen/mug")) \
                and time.monotonic() < deadline:  # the shipped generation, with the enrolled item replayed
            time.sleep(0.1)
        ids = sorted(it.id for it in app.catalog.holder.current().items)
        assert ids == ["brick", "kitchen/mug", "rocket"]  # the shipped items + the one enrolled here
        live = app.catalog.holder.current().generation
        assert live != shipped.name  # the replay made one more generation on top of the shipped one
        write_index(app.catalog.holder.path, [CatalogItem("other", "x", np.ones(8, np.float32))], bundle_sha256="0" * 64,
                    n_trees=2)
        time.sleep(1.0)
        assert app.catalog.holder.current().generation == live and app.catalog.holder.current().has("rocket")  # refused, still serving
        r = app.query_image(encode_jpeg(view(photos, "rocket", "closeup", seed=2)), "upload")
        assert r.results[0].id == "rocket"
    finally:
        app.stop()
