"""Recent lookups (edge_retrieval/outputs/history.py), the page's status and history API on a real appliance, the verified
region (verify.region → Candidate.quad), the ranked score in the JSON, and the start-up friction fixes."""
from __future__ import annotations

import io
import json
import time

import cv2
import numpy as np
import pytest

from edge_retrieval.app.systemd import page_urls
from edge_retrieval.cli import _parser, _with_listen_flags
from edge_retrieval.core.config import Config, HistoryConfig, RecognitionConfig, WebConfig
from edge_retrieval.core.errors import ConfigError
from edge_retrieval.core.results import Candidate, LookupResult
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.model.local_features import extract, match_homography, region
from edge_retrieval.outputs.history import CSV_COLUMNS, History
from edge_retrieval.web import create_app
from tests.conftest import make_appliance, view

TOKEN = "s3cret-token"


def _result(i: int, match: bool = True) -> LookupResult:
    c = Candidate(f"cat/{i}", f"item {i}", 0.8, inliers=30, rank_score=1.175)
    return LookupResult(results=[c], timings_ms={"total": 12.0}, source="camera", match=c if match else None)


def test_history_is_bounded_by_count_and_kept_across_a_restart(tmp_path):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "lookup-00000007.jpg").write_bytes(b"a snapshot file of an earlier version")
    config = HistoryConfig(size=3, dir=tmp_path / "h", snapshot_px=64)
    history = History(config)
    frame = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    for i in range(5):
        history.record(_result(i, match=i % 2 == 0), frame if i != 3 else None)
    assert [e.n for e in history.entries()] == [5, 4, 3]
    assert sorted(p.name for p in (tmp_path / "h").iterdir() if p.suffix == ".jpg") == []
    assert history.image(1) is None and history.image(4) is None  # gone / recorded without a frame
    jpeg = history.image(5)
    assert jpeg[:2] == b"\xff\xd8" and max(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1).shape[:2]) == 64
    rows = history.to_csv().splitlines()
    assert rows[0].split(",") == list(CSV_COLUMNS) and len(rows) == 4
    assert rows[1].split(",")[2:7] == ["camera", "match", "cat/4", "item 4", "30"]
    assert history.entries()[1].to_json()["decision"] == "no_match"  # one spelling, as in MQTT and /metrics
    c = Candidate("cat/x", "=HYPERLINK(\"http://evil\")", 0.8, inliers=30, rank_score=1.1)
    history.record(LookupResult(results=[c], timings_ms={}, source="upload", match=c), None)
    assert "'=HYPERLINK" in history.to_csv().splitlines()[1]  # a label is text in a spreadsheet, never a formula
    before = [e.to_json() for e in history.entries()]
    history.close()

    again = History(config)  # a restart: the same entries, their snapshots, and the numbering goes on
    assert [e.to_json() for e in again.entries()] == before
    assert again.image(5) == jpeg
    assert again.record(_result(9), frame).n == 7 and [e.n for e in again.entries()] == [7, 6, 5]
    again.close()
    assert [e.n for e in History(HistoryConfig(size=2, dir=tmp_path / "h")).entries()] == [7, 6]  # a smaller size


def test_history_is_bounded_by_bytes_and_always_keeps_the_newest(tmp_path):
    frame = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)  # noise: large JPEGs
    config = HistoryConfig(size=1000, max_mb=0.2, dir=tmp_path / "h", snapshot_px=320)
    history = History(config)
    for i in range(40):
        history.record(_result(i), frame)
    kept = history.entries()
    assert 1 < len(kept) < 40 and kept[0].n == 40 and history.stored_bytes() <= 0.2 * 2**20
    assert history.image(1) is None and history.image(40) is not None
    tiny = History(HistoryConfig(max_mb=0.001, dir=tmp_path / "tiny"))  # smaller than one snapshot
    tiny.record(_result(1), frame)
    tiny.record(_result(2), frame)
    assert [e.n for e in tiny.entries()] == [2] and tiny.image(2) is not None


def test_a_torn_write_loses_at_most_the_last_entry(tmp_path):
    import shutil
    config = HistoryConfig(size=100, dir=tmp_path / "h", snapshot_px=64)
    history = History(config)
    frame = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for i in range(6):
        history.record(_result(i), frame)
    # what a kill -9 in the middle of the 6th write leaves: the open store with its WAL cut short
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("history.sqlite", "history.sqlite-wal"):
        shutil.copy(tmp_path / "h" / name, crashed / name)
    wal = crashed / "history.sqlite-wal"
    wal.write_bytes(wal.read_bytes()[:-300])
    kept = [e.n for e in History(HistoryConfig(dir=crashed)).entries()]
    assert kept in ([5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1]), kept
    history.close()


def test_an_unreadable_store_is_moved_aside_and_never_stops_a_start(tmp_path, caplog):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "history.sqlite").write_bytes(b"not a database at all, " * 100)
    history = History(HistoryConfig(dir=tmp_path / "h"))
    assert history.entries() == [] and history.record(_result(1)).n == 1
    assert "cannot be read" in caplog.text
    assert [p.name for p in (tmp_path / "h").glob("history.sqlite.unreadable-*")]
    history.close()
    import sqlite3
    with sqlite3.connect(tmp_path / "h" / "history.sqlite") as db:  # one row that is not a lookup result
        db.execute("INSERT INTO lookups (result) VALUES ('{\"not\": \"a result\"}')")
    db.close()
    again = History(HistoryConfig(dir=tmp_path / "h"))
    assert [e.n for e in again.entries()] == [1] and "dropping lookup 2" in caplog.text
    assert again.record(_result(3)).n == 3  # never reused


def test_history_without_a_writable_folder_keeps_lookups_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    history = History(HistoryConfig(dir=blocker / "h"))
    history.record(_result(1), np.zeros((32, 32, 3), np.uint8))
    assert [e.has_image for e in history.entries()] == [True] and history.image(1) is not None
    assert "in memory" in caplog.text


def test_candidate_json_carries_the_ranked_score_and_the_region():
    plain = Candidate("a", "A", 0.5).to_json()
    assert plain == {"id": "a", "label": "A", "score": 0.5, "rank_score": 0.5, "attributes": {}}
    fused = Candidate("a", "A", 0.5, inliers=20, rank_score=0.75, quad=((0, 0), (1, 0), (1, 1), (0, 1))).to_json()
    assert fused["score"] == 0.5 and fused["rank_score"] == 0.75 and fused["quad"][2] == [1, 1]


def _on_canvas(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` at half size in the middle of a grey 2x canvas: its region is (0.25, 0.25)..(0.75, 0.75)."""
    h, w = rgb.shape[:2]
    canvas = np.full((h * 2, w * 2, 3), 120, np.uint8)
    canvas[h // 2:h // 2 + h, w // 2:w // 2 + w] = rgb
    return canvas


def test_region_maps_the_catalog_corners_into_the_query_frame(photos):
    cfg = RecognitionConfig()
    astronaut = photos["astronaut"]
    query, cand = extract(_on_canvas(astronaut), cfg, query=True), extract(astronaut, cfg)
    inliers, h = match_homography(query, cand, cfg)
    quad = region(query, cand, h)
    assert inliers > 100 and quad is not None
    assert np.allclose(quad, [(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)], atol=0.03)
    flat = extract(np.full((480, 640, 3), 128, np.uint8), cfg, query=True)
    assert match_homography(flat, cand, cfg) == (0, None) and region(flat, cand, None) is None


@pytest.fixture()
def appliance(tmp_path, catalog_dir, encoder):
    app = make_appliance(tmp_path, encoder, catalog_dir, index={"top_k": 3})
    yield app
    app.stop()


def test_an_upload_is_kept_with_its_photo_ranked_score_and_region(appliance, photos):
    client = create_app(WebConfig(api_token=TOKEN), appliance).test_client()
    photo = encode_jpeg(_on_canvas(photos["rocket"]), 90)
    body = client.post("/api/query", data={"image": (io.BytesIO(photo), "p.jpg")},
                       content_type="multipart/form-data").get_json()
    match = body["match"]
    assert match["id"] == "rocket" and match["rank_score"] > match["score"]
    assert np.allclose(match["quad"], [(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)], atol=0.05)
    ranks = [c["rank_score"] for c in body["results"]]
    assert ranks == sorted(ranks, reverse=True)  # the score shown is the one they are ranked by

    history = client.get("/api/history").get_json()
    entry = history["entries"][0]
    assert entry["n"] == 1 and entry["source"] == "upload" and entry["decision"] == "match"
    image = client.get(entry["image_url"])
    assert image.status_code == 200 and image.mimetype == "image/jpeg"
    assert client.get("/api/history/99/image.jpg").status_code == 404
    csv_text = client.get("/api/history.csv").get_data(as_text=True)
    assert csv_text.splitlines()[1].startswith("1,") and ",upload,match,rocket," in csv_text

    status = client.get("/api/status").get_json()
    assert status["lookups_per_min"] == 1 and status["latest"]["n"] == 1 and status["looking_up"] is False
    assert status["camera"]["state"] == "absent" and status["trigger"] == {"enabled": False}
    assert status["process"]["rss_mb"] > 10 and status["index"]["size"] > 0
    assert status["verification"]["enabled"] is True


def test_catalog_search_and_enrol_from_the_camera_need_the_token(appliance):
    client = create_app(WebConfig(api_token=TOKEN), appliance).test_client()
    found = client.get("/api/catalog?q=SPACE").get_json()
    assert [it["id"] for it in found["items"]] == ["space"] and found["total"] == 1
    assert client.post("/api/catalog/camera", json={"label": "x"}).status_code == 401
    no_camera = client.post("/api/catalog/camera", json={"label": "x"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert no_camera.status_code == 409 and "camera" in no_camera.get_json()["error"]
    assert client.get("/favicon.ico").status_code == 301
    assert client.get("/static/favicon.svg").status_code == 200


def test_serve_flags_override_the_web_section_and_urls_are_clickable():
    args = _parser().parse_args(["serve", "--port", "9090", "--host", "127.0.0.1"])
    web = _with_listen_flags(Config(), args).web
    assert (web.host, web.port) == ("127.0.0.1", 9090)
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--port", "0"])
    with pytest.raises(ConfigError):
        _with_listen_flags(Config(), _parser().parse_args(["serve", "--port", "70000"]))
    assert page_urls("127.0.0.1", 8080) == ["http://127.0.0.1:8080/"]
    urls = page_urls("0.0.0.0", 8080)
    assert urls[0] == "http://127.0.0.1:8080/" and all("0.0.0.0" not in u for u in urls)


def test_the_converter_says_which_extra_to_install_without_tensorflow(monkeypatch, capsys):
    import edge_retrieval.convert.__main__ as cli

    def missing():
        raise ModuleNotFoundError("No module named 'keras'", name="keras")

    monkeypatch.setattr(cli, "_parser", missing)
    assert cli.main(["--help"]) == 2
    assert "pip install -e '.[converter]'" in capsys.readouterr().err


def test_the_console_script_is_declared():
    from pathlib import Path

    import tomllib
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"edge-retrieval": "edge_retrieval.cli:main"}
    assert isinstance(project["license"], str) and "selenium>=4.10" in project["optional-dependencies"]["dev"]
    assert json.dumps(project)  # plain data


# ------------------------------------------------------------------------------- a real serve, stopped and killed

def _get(serve, path: str) -> tuple[int, str, bytes]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.port}{path}", timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_a_lookup_is_listed_with_its_image_after_a_restart(tmp_path, small_catalog, photos):
    from tests.support.serve import Serve
    serve = Serve(tmp_path, small_catalog, "recognition:\n  adapt: false\n")
    try:
        serve.start()
        status, result = serve.upload("/api/query", encode_jpeg(_on_canvas(photos["rocket"]), 90))
        assert status == 200 and result["match"]["id"] == "rocket"
        serve.stop()  # SIGTERM
        serve.start()
        _, listed = serve.request("GET", "/api/history")
        entry = listed["entries"][0]
        assert (entry["n"], entry["timestamp"], entry["decision"], entry["match"]["id"], entry["source"]) == (
            1, result["timestamp"], "match", "rocket", "upload")
        code, kind, jpeg = _get(serve, entry["image_url"])
        assert code == 200 and kind == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
        csv_text = _get(serve, "/api/history.csv")[2].decode()
        assert csv_text.splitlines()[1].startswith("1,") and ",upload,match,rocket," in csv_text
        status, after = serve.upload("/api/query", encode_jpeg(photos["moon"], 90))
        _, listed = serve.request("GET", "/api/history")
        assert [e["n"] for e in listed["entries"]] == [2, 1]  # the numbering goes on
    finally:
        serve.stop()


def test_kill_9_while_lookups_are_recorded_keeps_all_but_at_most_the_last(tmp_path, small_catalog, photos):
    import threading

    from tests.support.serve import Serve
    serve = Serve(tmp_path, small_catalog, "recognition:\n  adapt: false\nhistory:\n  size: 500\n")
    jpegs = [encode_jpeg(view(photos, name, "closeup", seed=i), 85) for i, name in enumerate(("rocket", "moon"))]
    acknowledged: list[float] = []
    stop = threading.Event()

    def keep_uploading() -> None:
        i = 0
        while not stop.is_set() and i < 200:
            try:
                status, body = serve.upload("/api/query", jpegs[i % 2])
            except OSError:  # the server was killed under this request
                return
            if status == 200:
                acknowledged.append(body["timestamp"])
            i += 1

    try:
        serve.start()
        uploader = threading.Thread(target=keep_uploading)
        uploader.start()
        deadline = time.monotonic() + 120
        while len(acknowledged) < 8 and uploader.is_alive():
            assert time.monotonic() < deadline, "uploads were too slow"
            time.sleep(0.01)
        serve.kill9()  # mid-upload: the next lookup is being recorded
        stop.set()
        uploader.join(30)
        serve.start()
        _, listed = serve.request("GET", "/api/history?limit=1000")
        kept = [e["timestamp"] for e in reversed(listed["entries"])]
        assert kept[:len(acknowledged)] == acknowledged, "an acknowledged lookup was lost"
        assert len(kept) <= len(acknowledged) + 1
        status, _ = serve.upload("/api/query", jpegs[0])
        _, listed = serve.request("GET", "/api/history?limit=1")
        assert status == 200 and listed["entries"][0]["n"] == len(kept) + 1
    finally:
        stop.set()
        serve.stop()
