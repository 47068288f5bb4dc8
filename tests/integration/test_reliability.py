"""Hostile and broken input, tried as an attacker and a power cut would: every bad upload gets a clear 4xx and
leaves nothing behind, ids follow one rule, another site's page cannot drive the device, and an acknowledged
enrolment survives ``kill -9`` of a real ``serve`` process (fast, offline, loopback only, bounded loops)."""
from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from edge_retrieval.core.config import WebConfig
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.web import create_app
from tests.conftest import OPEN_BUNDLE, view, web_client
from tests.support.serve import AUTH, TOKEN, Serve, bad_input_corpus


# The fixtures here test HTTP and durability, not recognition: no catalog adaptation (it fits a projection on
# synthetic views at every index build), with the decision thresholds calibrated for unadapted cosines.
@pytest.fixture(scope="module")
def corpus(photos) -> dict[str, tuple[bytes, int, str]]:
    return bad_input_corpus(photos)


def _post(client, url, data: bytes, headers=None, **fields):
    return client.post(url, headers=headers or {}, data={"image": (io.BytesIO(data), "x.jpg"), **fields})


def _nothing_written(app, generation: str, tmp_path) -> None:
    enrolled = tmp_path / "enrolled"
    assert not enrolled.exists() or not [p for p in enrolled.rglob("*") if p.is_file()]
    assert app.catalog.holder.current().generation == generation


def test_every_bad_upload_gets_its_exact_status_and_nothing_is_written(appliance, corpus, tmp_path):
    client = web_client(appliance)
    gen = appliance.catalog.holder.current().generation
    for name, (data, status, words) in corpus.items():
        for url, fields in (("/api/query", {}), ("/api/catalog", {"label": "x", "id": f"t/{name}"})):
            r = _post(client, url, data, AUTH if url == "/api/catalog" else None, **fields)
            want = (202 if url == "/api/catalog" else 200) if status == 200 else status
            assert r.status_code == want, (name, url, r.status_code, r.get_json())
            if status != 200:
                assert words in r.get_json()["error"], (name, r.get_json())
        if status != 200:
            _nothing_written(appliance, gen, tmp_path)
    # the device still answers, and the valid odd formats were enrolled under their ids
    assert client.get("/api/health").status_code == 200
    deadline = time.monotonic() + 30
    while not appliance.catalog.holder.current().has("t/exif_rotated") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert appliance.catalog.holder.current().has("t/cmyk_jpeg")


def test_exif_orientation_is_applied_before_the_lookup(appliance, photos, corpus):
    client = web_client(appliance)
    upright = _post(client, "/api/query", encode_jpeg(np.asarray(Image.fromarray(photos["astronaut"]))))
    rotated = _post(client, "/api/query", corpus["exif_rotated"][0])
    assert upright.get_json()["results"][0]["id"] == rotated.get_json()["results"][0]["id"] == "astronaut"


@pytest.mark.parametrize("item_id", ["t3/.hidden", "t3/.", "t3/...", "t3//double", "../../etc/passwd", "/abs",
                                     "trailing/", "a/-b", "界" * 200, "a/" + "界" * 41])
def test_ids_follow_one_rule_and_a_bad_one_is_a_400_that_states_it(appliance, photos, tmp_path, item_id):
    client = web_client(appliance)
    gen = appliance.catalog.holder.current().generation
    r = _post(client, "/api/catalog", encode_jpeg(photos["coffee"]), AUTH, label="Mug", id=item_id)
    assert r.status_code == 400, r.get_json()
    assert "invalid catalog id" in r.get_json()["error"] and "each part starts with" in r.get_json()["error"]
    _nothing_written(appliance, gen, tmp_path)


def test_labels_and_form_fields_name_the_real_limit(appliance, photos, tmp_path):
    client = web_client(appliance)
    gen = appliance.catalog.holder.current().generation
    r = _post(client, "/api/catalog", encode_jpeg(photos["coffee"]), AUTH, label="x" * 300, id="ok")
    assert r.status_code == 400 and "at most 200" in r.get_json()["error"]
    r = _post(client, "/api/catalog", encode_jpeg(photos["coffee"]), AUTH, label="x" * 600_000, id="ok")
    assert r.status_code == 413 and "form field" in r.get_json()["error"]
    small = create_app(WebConfig(api_token=TOKEN, max_upload_mb=1), appliance).test_client()
    r = _post(small, "/api/query", b"\xff" * 2_000_000)
    assert r.status_code == 413 and "web.max_upload_mb" in r.get_json()["error"]
    _nothing_written(appliance, gen, tmp_path)


def test_another_sites_page_cannot_post_and_pages_carry_security_headers(appliance, photos):
    client = web_client(appliance)
    q = encode_jpeg(photos["moon"])
    evil = _post(client, "/api/query", q, {"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.get_json()["error"]
    assert client.post("/api/lookup", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert _post(client, "/api/query", q, {"Origin": "http://localhost"}).status_code == 200  # the device's page
    assert _post(client, "/api/query", q).status_code == 200  # curl, scripts: no Origin
    page = client.get("/")
    assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def test_health_shows_names_not_paths_without_the_token(appliance, tmp_path):
    client = web_client(appliance)
    anonymous = json.dumps(client.get("/api/health").get_json())
    assert str(tmp_path) not in anonymous and str(OPEN_BUNDLE) not in anonymous
    assert '"path": "index"' in anonymous
    assert str(tmp_path) in json.dumps(client.get("/api/health", headers=AUTH).get_json())


def test_a_burst_of_uploads_gets_503_with_retry_after_not_unbounded_memory(appliance, photos):
    client = web_client(appliance)
    entered, release = threading.Event(), threading.Event()
    real = appliance.lookup.decode  # an upload's first step

    def slow(data):
        entered.set()
        release.wait(10)
        return real(data)

    appliance.lookup.decode = slow
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=_post(client, "/api/query", encode_jpeg(photos["moon"]))))
    t.start()
    assert entered.wait(10)
    second = _post(client, "/api/query", encode_jpeg(photos["moon"]))
    release.set()
    t.join(10)
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"
    assert "web.max_parallel_uploads" in second.get_json()["error"]
    assert first["r"].status_code == 200


# ------------------------------------------------------------------------------------- kill -9 of a real serve

def test_acknowledged_enrolments_survive_kill_9_and_removals_stay_removed(tmp_path, small_catalog, photos):
    serve = Serve(tmp_path, small_catalog)
    try:
        serve.start()
        acknowledged = []
        for i, delay_s in enumerate((0.0, 0.01, 0.03, 0.1)):
            name = ("coffee", "chelsea", "astronaut", "grace_hopper")[i]
            status, body = serve.upload("/api/catalog", encode_jpeg(photos[name], 92), label=name.title(),
                                        id=f"kept/{name}")
            assert status == 202, body
            acknowledged.append(name)
            time.sleep(delay_s)
            serve.kill9()  # a power cut right after the acknowledgement
            serve.start()
        status, body = serve.upload("/api/catalog", encode_jpeg(np.zeros((1, 1, 3), np.uint8)), label="x", id="bad")
        assert status == 400  # a rejected enrolment is not kept, and the next start is not hurt by it
        assert serve.request("DELETE", "/api/catalog/moon", headers=AUTH)[0] == 200
        serve.kill9()
        serve.start()
        _, cat = serve.request("GET", "/api/catalog?limit=100")
        ids = {it["id"] for it in cat["items"]}
        assert {f"kept/{n}" for n in acknowledged} <= ids and "moon" not in ids and "bad" not in ids
        for name in acknowledged:  # queryable, not only listed
            _, res = serve.upload("/api/query", encode_jpeg(view(photos, name, "closeup", seed=5)))
            assert res["results"][0]["id"] == f"kept/{name}", (name, res["results"][:2])
        _, health = serve.request("GET", "/api/health", headers=AUTH)
        assert health["enrolled"]["skipped"] == []
    finally:
        serve.stop()
