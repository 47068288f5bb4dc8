"""HTTP tests of edge_retrieval/web/ against a fake appliance (no camera, no model), flaskr style."""
from __future__ import annotations

import io
import json
import re
import socket
import time
import urllib.request

import numpy as np
import pytest
import skimage.data
from PIL import Image

from edge_retrieval.core.config import SseConfig, WebConfig
from edge_retrieval.core.errors import CatalogIndexError, ImageError, InputError
from edge_retrieval.core.results import Candidate, LookupResult
from edge_retrieval.core.status import (
    BundleInfo,
    CameraStatus,
    CatalogHealth,
    Health,
    IndexHealth,
    IndexSummary,
    LatestLookup,
    ProcessStatus,
    Status,
    TriggerStatus,
)
from edge_retrieval.outputs.metrics import Metrics
from edge_retrieval.outputs.push import PushHub
from edge_retrieval.web import create_app, serve
from edge_retrieval.web.services import Services


def jpeg_of(rgb: np.ndarray, size: int = 64) -> bytes:
    """A small real JPEG of an RGB uint8 array."""
    image = Image.fromarray(rgb)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


ASTRONAUT = jpeg_of(skimage.data.astronaut())
COFFEE = jpeg_of(skimage.data.coffee())


class FakeServices:
    """The web layer's ``Services`` (edge_retrieval/web/services.py), as the real appliance has them, with canned
    answers (camera states the real camera reports), recording the calls; no history, an idle push hub."""

    def __init__(self, *, camera: bool = True, ok: bool = True):
        self.ok = ok
        self.history = None
        self.push = PushHub(SseConfig())
        self.metrics = Metrics()
        self.metrics.lookups.labels("camera").inc(3)
        self.metrics.lookups.labels("upload").inc()
        self.metrics.read_at_scrape("appliance_index_items", "items", "gauge", lambda: len(self.catalog))
        self.frames = [(1, ASTRONAUT), (2, COFFEE)] if camera else []
        self.latest: LookupResult | None = None
        self.lookups_requested = 0
        self.enrolled: list[tuple[bytes, str, str | None]] = []
        self.removed: list[str] = []
        self.catalog = {"cat/1": "astronaut", "cat/2": "coffee cup"}
        self.attributes: dict = {}
        self.photos: list = []
        self.explode = False

    def query_image(self, data: bytes, source: str) -> LookupResult:
        if self.explode:
            raise RuntimeError("boom")
        try:
            Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:
            raise ImageError("cannot decode the uploaded image (not a JPEG/PNG?)") from exc
        self.latest = LookupResult(
            results=[Candidate("cat/1", "astronaut", 0.91), Candidate("cat/2", "coffee cup", 0.42)],
            timings_ms={"decode": 1.5, "encode": 20.25, "search": 0.5},
            source=source,
        )
        return self.latest

    def latest_result(self) -> LookupResult | None:
        return self.latest

    def latest_frame_jpeg(self) -> tuple[int, bytes] | None:
        return self.frames[-1] if self.frames else None

    def wait_frame_jpeg(self, after_index: int, timeout_s: float) -> tuple[int, bytes] | None:
        # a camera producing a new frame every call
        if not self.frames:
            return None
        index, jpeg = self.frames[-1]
        self.frames.append((index + 1, jpeg))
        return self.frames[-1]

    def request_lookup(self) -> None:
        self.lookups_requested += 1

    def _camera(self) -> CameraStatus:
        return CameraStatus(state="streaming" if self.ok else "reconnecting", spec="/dev/video0")

    def health(self) -> Health:
        if self.explode:
            raise RuntimeError("boom")
        return Health(ok=self.ok, camera=self._camera(), bundle=BundleInfo(
                          name="effnet-lite0", path="/opt/models/effnet", sha256="0" * 64, quantization="int8",
                          output_dim=256, format="tflite", input="224x224 uint8", runtime="tflite", num_threads=2),
                      index=IndexHealth(size=len(self.catalog), generation="gen-000003", path="/var/lib/x/catalog",
                                        n_trees=10, search_k=5000),
                      verification={"enabled": False, "why": "fake"}, adaptation={"enabled": False}, uptime_s=12.5,
                      enrolled=CatalogHealth(store="/var/lib/x/catalog.sqlite", seq=0, applied_seq=0, pending=0,
                                             enrolled=0, removed=0))

    def status(self) -> Status:
        return Status(camera=self._camera(), trigger=TriggerStatus(enabled=False), looking_up=False,
                      lookups_per_min=self.lookups_requested, process=ProcessStatus(),
                      index=IndexSummary(size=len(self.catalog), generation="gen-000003"),
                      verification={"enabled": False}, latest=LatestLookup(), uptime_s=12.5)

    def enrol_frame(self, label: str, item_id: str | None, *, attributes: dict | None = None,
                    replace: bool = False) -> dict:
        if not self.frames:
            raise InputError("no camera frame to enrol (is the camera streaming?)", http_status=409)
        return self.enrol(self.frames[-1][1], label, item_id, attributes=attributes, replace=replace)

    def enrol(self, data: bytes, label: str, item_id: str | None, *, attributes: dict | None = None,
              replace: bool = False) -> dict:
        if item_id in self.catalog and not replace:
            raise InputError(f"item {item_id!r} is in the catalog already", http_status=409)
        self.enrolled.append((data, label, item_id))
        self.attributes[item_id] = attributes
        item_id = item_id or f"cat/{len(self.catalog) + 1}"
        self.catalog[item_id] = label
        return {"id": item_id, "label": label, "status": "queued"}

    def add_photo(self, item_id: str, data: bytes | None, photo: str | None = None) -> dict:
        if item_id not in self.catalog:
            raise InputError(f"item {item_id!r} is not in the catalog", http_status=404)
        self.photos.append((item_id, data if data is not None else self.frames[-1][1], photo))
        return {"id": item_id, "photo": photo or "2", "status": "queued"}

    def remove_photo(self, item_id: str, photo: str) -> dict:
        if not any(p[0] == item_id and (p[2] or "2") == photo for p in self.photos):
            raise InputError(f"item {item_id!r} has no photo {photo!r}", http_status=404)
        return {"id": item_id, "photo": photo, "status": "removed"}

    def item_details(self, item_id: str) -> dict:
        if item_id not in self.catalog:
            raise InputError(f"item {item_id!r} is not in the catalog", http_status=404)
        return {"id": item_id, "label": self.catalog[item_id], "attributes": self.attributes.get(item_id) or {},
                "photos": [{"photo": ""}] + [{"photo": p[2] or "2"} for p in self.photos if p[0] == item_id]}

    def remove(self, item_id: str) -> bool:
        self.removed.append(item_id)
        return self.catalog.pop(item_id, None) is not None

    def thumbnail(self, item_id: str, photo: str = "") -> bytes | None:
        return ASTRONAUT if item_id in self.catalog else None

    def catalog_items(self) -> list[dict]:
        return [{"id": k, "label": v} for k, v in self.catalog.items()]


def test_the_fake_is_what_the_web_layer_calls_as_the_appliance_is():
    from tests.support.protocols import protocol_mismatches
    assert protocol_mismatches(Services, FakeServices()) == []


@pytest.fixture
def services() -> FakeServices:
    return FakeServices()


def make_client(services: FakeServices, **settings):
    settings.setdefault("stream_fps", 60.0)
    app = create_app(WebConfig(**settings), services)
    app.testing = True
    return app.test_client()


@pytest.fixture
def client(services):
    return make_client(services, api_token="s3cret-token")


def upload(client, url, data: bytes, **fields):
    form = {"image": (io.BytesIO(data), "photo.jpg"), **fields}
    return client.post(url, data=form, content_type="multipart/form-data")


# --- page ---------------------------------------------------------------------------------------

def test_page_renders_with_live_view_and_assets(client):
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'src="/stream.mjpg"' in html
    assert "/static/app.js" in html and "/static/style.css" in html
    assert "Look up now" in html
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "css")):
        response = client.get(asset)
        assert response.status_code == 200 and kind in response.content_type
        response.close()


# --- status -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ok, status", [(True, 200), (False, 503)])
def test_health_status_follows_ok_flag(ok, status):
    response = make_client(FakeServices(ok=ok)).get("/api/health")
    assert response.status_code == status
    assert response.get_json()["ok"] is ok
    assert response.get_json()["bundle"]["name"] == "effnet-lite0"


METRIC_LINE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? ([-+0-9.eE]+|NaN|[+-]Inf)$'
)


def test_metrics_prometheus_text(client):
    client.get("/api/health")
    client.get("/api/nope")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    text = response.get_data(as_text=True)
    assert "# TYPE appliance_lookups_total counter" in text
    assert 'appliance_lookups_total{source="camera"} 3.0' in text
    assert 'appliance_lookups_total{source="upload"} 1.0' in text
    assert "# TYPE appliance_index_items gauge" in text and "appliance_index_items 2.0" in text
    assert "appliance_http_streams_open 0.0" in text
    assert 'appliance_http_requests_total{method="GET",route="/api/health",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    for line in text.splitlines():
        assert line.startswith(("# TYPE ", "# HELP ")) or METRIC_LINE.match(line), line


# --- lookups ------------------------------------------------------------------------------------

def test_query_with_real_jpeg_returns_results_and_timings(client, services):
    response = upload(client, "/api/query", COFFEE)
    assert response.status_code == 200
    body = response.get_json()
    assert [r["id"] for r in body["results"]] == ["cat/1", "cat/2"]
    assert body["results"][0]["score"] == pytest.approx(0.91)
    assert set(body["timings_ms"]) == {"decode", "encode", "search"}
    assert body["source"] == "upload"
    thumb = client.get(body["results"][0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.content_type == "image/jpeg"
    assert thumb.data[:2] == b"\xff\xd8"


def test_query_missing_field_is_400(client):
    response = client.post("/api/query", data={"other": "x"}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json() == {"error": "missing multipart field 'image'"}


def test_query_non_image_is_400_with_image_error_message(client):
    response = upload(client, "/api/query", b"this is not a picture")
    assert response.status_code == 400
    assert response.get_json() == {"error": "cannot decode the uploaded image (not a JPEG/PNG?)"}


def test_image_error_may_choose_its_status(client, services):
    def unsupported(data, source):
        error = ImageError("HEIC is not supported")
        error.http_status = 415
        raise error

    services.query_image = unsupported
    response = upload(client, "/api/query", ASTRONAUT)
    assert response.status_code == 415
    assert response.get_json() == {"error": "HEIC is not supported"}


def test_oversized_upload_is_413_json(services):
    big = jpeg_of(skimage.data.astronaut(), size=512)
    assert len(big) > 0.01 * 1024 * 1024
    response = upload(make_client(services, max_upload_mb=0.01), "/api/query", big)
    assert response.status_code == 413
    assert "web.max_upload_mb" in response.get_json()["error"]


def test_other_appliance_errors_are_503(client, services):
    def broken(data, source):
        raise CatalogIndexError("index was built with another bundle")

    services.query_image = broken
    response = upload(client, "/api/query", ASTRONAUT)
    assert response.status_code == 503
    assert response.get_json() == {"error": "index was built with another bundle"}


def test_latest_result_before_and_after(client):
    before = client.get("/api/results/latest")
    assert before.status_code == 200
    assert before.get_json() == {"results": [], "timings_ms": {}, "source": None, "timestamp": None}
    upload(client, "/api/query", ASTRONAUT)
    after = client.get("/api/results/latest").get_json()
    assert after["results"][0]["label"] == "astronaut"
    assert after["results"][0]["thumbnail_url"] == "/api/catalog/cat/1/thumb.jpg"
    assert after["timestamp"] is not None


def test_lookup_now_triggers_services(client, services):
    response = client.post("/api/lookup")
    assert response.status_code == 202
    assert services.lookups_requested == 1


# --- catalog ------------------------------------------------------------------------------------

def test_catalog_changes_disabled_without_token(services):
    client = make_client(services, api_token=None)
    response = upload(client, "/api/catalog", ASTRONAUT, label="x")
    assert response.status_code == 403
    assert response.get_json() == {
        "error": "catalog changes are disabled: set web.api_token in config.yaml"
    }
    assert client.delete("/api/catalog/cat/1").status_code == 403
    assert services.enrolled == [] and services.removed == []


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic s3cret-token", "Bearer s3cret-token-and-more"])
def test_catalog_changes_need_the_right_token(client, services, header):
    headers = {"Authorization": header} if header else {}
    response = client.delete("/api/catalog/cat/1", headers=headers)
    assert response.status_code == 401
    assert "error" in response.get_json()
    assert services.removed == []


def test_catalog_enrol_list_thumb_and_delete_with_token(client, services):
    auth = {"Authorization": "Bearer s3cret-token"}
    response = client.post(
        "/api/catalog",
        data={"image": (io.BytesIO(COFFEE), "c.jpg"), "label": "mug", "id": "shop/mug-7"},
        content_type="multipart/form-data",
        headers=auth,
    )
    assert response.status_code == 202
    assert response.get_json() == {"id": "shop/mug-7", "label": "mug", "status": "queued"}
    assert services.enrolled == [(COFFEE, "mug", "shop/mug-7")]

    page = client.get("/api/catalog?offset=1&limit=1").get_json()
    assert page == {"items": [{"id": "cat/2", "label": "coffee cup"}], "total": 3,
                    "offset": 1, "limit": 1}
    assert client.get("/api/catalog?limit=abc").status_code == 400
    assert client.get("/api/catalog/shop/mug-7/thumb.jpg").status_code == 200

    assert client.delete("/api/catalog/shop/mug-7", headers=auth).get_json()["status"] == "removed"
    assert services.removed == ["shop/mug-7"]
    missing = client.delete("/api/catalog/shop/mug-7", headers=auth)
    assert missing.status_code == 404 and "error" in missing.get_json()
    assert client.get("/api/catalog/shop/mug-7/thumb.jpg").status_code == 404


def test_catalog_enrol_needs_a_label(client):
    response = client.post("/api/catalog", data={"image": (io.BytesIO(ASTRONAUT), "a.jpg")},
                           content_type="multipart/form-data",
                           headers={"Authorization": "Bearer s3cret-token"})
    assert response.status_code == 400
    assert response.get_json() == {"error": "missing field 'label'"}


# --- live view ----------------------------------------------------------------------------------

def read_parts(response, want: int) -> bytes:
    """Read the streamed body until ``want`` multipart parts arrived (never the whole stream)."""
    data = b""
    for chunk in response.response:
        data += chunk
        if data.count(b"--frame") >= want and data.endswith(b"\r\n"):
            break
    return data


def test_stream_yields_jpeg_parts(client):
    response = client.get("/stream.mjpg", buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "multipart/x-mixed-replace"
    data = read_parts(response, want=2)
    response.close()
    header, _, rest = data.partition(b"\r\n\r\n")
    assert header.startswith(b"--frame\r\nContent-Type: image/jpeg")
    length = int(re.search(rb"Content-Length: (\d+)", header).group(1))
    assert rest[:2] == b"\xff\xd8" and rest[length - 2:length] == b"\xff\xd9"


def test_stream_limit_frees_slot_when_viewer_leaves(client):
    client.application.config["MAX_STREAMS"] = 1
    first = client.get("/stream.mjpg", buffered=False)
    read_parts(first, want=1)
    refused = client.get("/stream.mjpg", buffered=False)
    assert refused.status_code == 503 and "too many" in refused.get_json()["error"]
    first.close()
    again = client.get("/stream.mjpg", buffered=False)
    assert again.status_code == 200
    again.close()


def test_no_camera_stream_503_and_frame_404():
    client = make_client(FakeServices(camera=False))
    stream = client.get("/stream.mjpg")
    assert stream.status_code == 503 and "error" in stream.get_json()
    frame = client.get("/api/frame.jpg")
    assert frame.status_code == 404 and "error" in frame.get_json()


def test_single_frame(client):
    frame = client.get("/api/frame.jpg")
    assert frame.status_code == 200 and frame.content_type == "image/jpeg"
    assert frame.data == COFFEE


# --- errors -------------------------------------------------------------------------------------

def test_unknown_api_path_is_404_json(client):
    response = client.get("/api/x")
    assert response.status_code == 404
    assert "error" in response.get_json()
    wrong_method = client.get("/api/query")
    assert wrong_method.status_code == 405 and "error" in wrong_method.get_json()


def test_unexpected_exception_is_500_json_and_app_keeps_working(client, services, caplog):
    services.explode = True
    response = client.get("/api/health")
    assert response.status_code == 500
    assert "RuntimeError" in response.get_json()["error"]
    assert "unexpected error" in caplog.text
    services.explode = False
    assert client.get("/api/health").status_code == 200


def test_a_history_number_too_large_for_the_store_is_404_not_500(services, tmp_path):
    from edge_retrieval.core.config import HistoryConfig
    from edge_retrieval.outputs.history import History

    services.history = History(HistoryConfig(dir=tmp_path / "history"))
    try:
        client = make_client(services)
        assert client.get("/api/history/1/image.jpg").status_code == 404
        response = client.get("/api/history/99999999999999999999999999/image.jpg")
        assert response.status_code == 404 and "error" in response.get_json()
    finally:
        services.history.close()


@pytest.mark.parametrize("body", ["[" * 100_000, "{\"label\": " * 100_000, "{\"label\": \"x\"", "\xff"])
def test_json_too_deep_or_broken_is_400_not_500(client, body):
    response = client.post("/api/catalog/camera", data=body.encode("utf-8", "surrogateescape"),
                           content_type="application/json", headers={"Authorization": "Bearer s3cret-token"})
    assert response.status_code == 400 and "error" in response.get_json()


# --- waitress -----------------------------------------------------------------------------------

def test_served_by_waitress_over_real_http(services, waitress_server):
    port = waitress_server(create_app(WebConfig(), services))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Server"] == "waitress"
        assert json.load(response)["ok"] is True


def test_waitress_stream_ends_when_viewer_disconnects(services, waitress_server):
    app = create_app(WebConfig(stream_fps=50.0), services)
    app.config["MAX_STREAMS"] = 1
    port = waitress_server(app)
    viewer = socket.create_connection(("127.0.0.1", port), timeout=5)
    viewer.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    received = b""
    while b"--frame" not in received:
        received += viewer.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    viewer.close()
    # the server notices on its next writes, closes the generator and frees the stream slot
    deadline = time.monotonic() + 5
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            if "appliance_http_streams_open 0.0" in response.read().decode():
                break
        assert time.monotonic() < deadline, "stream still open after the viewer left"
        time.sleep(0.05)


class _NotServing:
    """What ``waitress.create_server`` gives ``serve`` in these tests: a server whose run() returns at once."""

    def run(self) -> None:
        pass


def test_serve_uses_waitress_with_the_configured_threads(services, monkeypatch):
    import waitress

    calls = {}
    monkeypatch.setattr(waitress, "create_server", lambda app, **kw: calls.update(kw) or _NotServing())
    config = WebConfig(host="127.0.0.1", port=9, threads=4)
    app = create_app(config, services)
    serve(app, config)
    assert calls == {"host": "127.0.0.1", "port": 9, "threads": 4, "connection_limit": 500,
                     "channel_timeout": 20.0, "cleanup_interval": 5.0, "channel_request_lookahead": 1,
                     "max_request_body_size": 11 * 1024 * 1024}
    assert app.config["MAX_STREAMS"] == 2


@pytest.mark.parametrize("max_upload_mb", [0.5, 10.0, 1024.0])
def test_serve_refuses_a_body_past_the_upload_limit_before_spooling_it(services, monkeypatch, max_upload_mb):
    import waitress

    calls = {}
    monkeypatch.setattr(waitress, "create_server", lambda app, **kw: calls.update(kw) or _NotServing())
    config = WebConfig(max_upload_mb=max_upload_mb)
    app = create_app(config, services)
    serve(app, config)
    # waitress refuses (413) past this without writing the body to disk; up to it Flask answers its JSON 413
    assert calls["max_request_body_size"] == int(max_upload_mb * 1024 * 1024) + 1024 * 1024
    assert calls["max_request_body_size"] > app.config["MAX_CONTENT_LENGTH"]
