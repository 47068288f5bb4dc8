"""Nothing lost, nothing in — round two, against real ``serve`` processes on 127.0.0.1 with scratch state: an
acknowledged re-enrolment or removal survives ``kill -9`` behind a queue of rebuilds, a CLI ``index build``
during enrolments is built upon (never undone), a second server on the same state refuses to start, damaged
derived state never stops a start, a full disk answers 507 and recovers by itself, and secrets stay out of the
log, health and metrics."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edge_retrieval.imaging.codec import encode_jpeg
from tests.conftest import view
from tests.support.serve import AUTH, ROOT, TOKEN, Serve

ENROL = ("coffee", "chelsea", "astronaut", "grace_hopper", "camera", "coins", "clock", "page", "china", "flower")
OTHERS = ("chelsea", "astronaut", "camera", "coins", "clock", "page", "china", "flower")  # neither A nor B


def _jpeg(photos, name: str) -> bytes:
    return encode_jpeg(photos[name], 90)


def _top(serve: Serve, photos, name: str) -> str | None:
    status, res = serve.upload("/api/query", encode_jpeg(view(photos, name, "closeup", seed=3)))
    assert status == 200, res
    return res["match"]["id"] if res.get("match") else None


def _wait(predicate, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_reenrolment_acknowledged_before_kill_9_is_what_comes_back(tmp_path, small_catalog, photos):
    """The tester's repro: X=A, 8 other enrolments back to back, X=B → 202, kill -9 30–200 ms later, restart:
    X is B (label and picture) in every trial, and a clean restart changes nothing."""
    serve = Serve(tmp_path, small_catalog)
    try:
        serve.start()
        for trial, delay_s in enumerate((0.03, 0.1, 0.2)):
            x = f"shelf/x{trial}"
            assert serve.upload("/api/catalog", _jpeg(photos, "coffee"), label="version A", id=x)[0] == 202
            for k, name in enumerate(OTHERS):
                assert serve.upload("/api/catalog", _jpeg(photos, name), label=name, id=f"t{trial}/{k}")[0] == 202
            status, body = serve.upload("/api/catalog", _jpeg(photos, "grace_hopper"), label="version B", id=x,
                                        replace="1")  # a re-enrolment says so (409 otherwise)
            assert status == 202, body
            time.sleep(delay_s)
            serve.kill9()
            serve.start()
            assert serve.catalog()[x] == "version B", (trial, delay_s)
            assert _top(serve, photos, "grace_hopper") in {f"shelf/x{t}" for t in range(trial + 1)}
        serve.stop()
        serve.start()
        listed = serve.catalog()
        assert all(listed[f"shelf/x{t}"] == "version B" for t in range(3))
        assert all(f"t{t}/{k}" in listed for t in range(3) for k in range(8))
    finally:
        serve.stop()


def test_a_removal_behind_queued_enrolments_stays_removed_through_kill_9(tmp_path, small_catalog, photos):
    serve = Serve(tmp_path, small_catalog)
    try:
        serve.start()
        assert serve.upload("/api/catalog", _jpeg(photos, "coffee"), label="X", id="shelf/x")[0] == 202
        for k, name in enumerate(OTHERS[:6]):  # six enrolments queued
            assert serve.upload("/api/catalog", _jpeg(photos, name), label=name, id=f"q/{k}")[0] == 202
        assert serve.upload("/api/catalog", _jpeg(photos, "coffee"), label="X again", id="shelf/x",
                            replace="1")[0] == 202
        assert serve.request("DELETE", "/api/catalog/shelf/x", headers=AUTH)[0] == 200
        assert "shelf/x" not in serve.catalog()  # the 200 came once the index no longer had it
        time.sleep(2.0)
        assert "shelf/x" not in serve.catalog() and _top(serve, photos, "coffee") != "shelf/x"
        assert serve.request("DELETE", "/api/catalog/moon", headers=AUTH)[0] == 200  # a catalog-folder item
        serve.kill9()
        serve.start()
        listed = serve.catalog()
        assert "shelf/x" not in listed and "moon" not in listed and all(f"q/{k}" in listed for k in range(6))
        assert _top(serve, photos, "coffee") != "shelf/x"
    finally:
        serve.stop()


def test_a_cli_index_build_during_enrolments_is_built_upon_not_undone(tmp_path, small_catalog, photos):
    """High 3: `index build` from the CLI while the server enrols over HTTP: afterwards the live index holds the
    CLI's folder AND every acknowledged HTTP enrolment, and keeps holding them."""
    serve = Serve(tmp_path, small_catalog, "recognition:\n  adapt: false\n")
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    new = ("astronaut", "camera", "coins", "clock", "page", "china", "flower", "retina", "immunohistochemistry")
    for name in new:
        (bigger / f"{name}.jpg").write_bytes(_jpeg(photos, name))
    acknowledged: list[str] = []
    refused: list = []
    try:
        serve.start()

        def enrol() -> None:
            for k in range(8):
                for _ in range(20):  # a 503 (busy: the CLI build takes the cores) says "again later", as a client would
                    status, body = serve.upload("/api/catalog", _jpeg(photos, ENROL[k % 4]), label="http", id=f"http/{k}")
                    if status != 503:
                        break
                    time.sleep(0.5)
                if status == 202:
                    acknowledged.append(f"http/{k}")
                else:
                    refused.append((status, body))
                time.sleep(0.2)

        t = threading.Thread(target=enrol)
        t.start()
        out = serve.cli("index", "build", "--catalog", str(bigger))
        t.join(120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(acknowledged) == 8, refused
        want = set(new) | set(acknowledged)
        _wait(lambda: want <= set(serve.catalog()), 60, "the CLI build plus every HTTP enrolment")
        time.sleep(6)  # a queued server rebuild or the watcher must not undo it
        listed = set(serve.catalog())
        assert want <= listed and "rocket" not in listed  # the CLI's folder replaced the old one
    finally:
        serve.stop()


def test_a_second_serve_on_the_same_state_refuses_naming_the_holder(tmp_path, small_catalog):
    first = Serve(tmp_path, small_catalog)
    try:
        first.start()
        second = Serve(tmp_path, small_catalog)  # same state, another port
        out = subprocess.run([sys.executable, "-m", "edge_retrieval", "serve", "--config", str(second.config)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2
        assert f"pid {first.proc.pid}" in out.stderr and "another `serve`" in out.stderr, out.stderr[-1000:]
        assert first.request("GET", "/api/health")[0] in (200, 503)
    finally:
        first.stop()


def _damage(state: Path, kind: str) -> None:
    index = state / "index"
    gen = index / os.readlink(index / "current")
    if kind == "current_regular_file":
        (index / "current").unlink()
        (index / "current").write_text(gen.name)
    elif kind == "meta_json":
        (gen / "meta.json").write_text('{"format_version": 1, "dim": ')
    elif kind == "vectors_ann":
        with open(gen / "vectors.ann", "r+b") as f:
            f.truncate(100)
    elif kind == "owners_npy":
        (gen / "owners.npy").write_bytes(b"\x93NUMPY garbage")
    elif kind == "thumbs_bin":
        (gen / "thumbs.bin").write_bytes(b"")


def test_damaged_derived_state_never_stops_a_start(tmp_path, small_catalog, photos):
    """The Pi install (no catalog.build_from): a damaged current generation, `current` made a regular file,
    and damaged legacy labels.json / removed.json are set aside or skipped, shown in /api/health, and the
    catalog comes back whole from the last intact generation plus the store."""
    legacy = tmp_path / "enrolled"
    legacy.mkdir()
    (legacy / "old.jpg").write_bytes(_jpeg(photos, "page"))
    (legacy / "labels.json").write_bytes(b"\xff\xfe{not utf-8")
    (legacy / "removed.json").write_text("[]")
    serve = Serve(tmp_path, small_catalog, build_from=False)
    assert serve.cli("index", "build", "--catalog", str(small_catalog)).returncode == 0
    try:
        serve.start()
        assert serve.upload("/api/catalog", _jpeg(photos, "coffee"), label="Mug", id="mug")[0] == 202
        _wait(lambda: "mug" in serve.catalog(), 30, "the enrolment")
        want = {"rocket", "moon", "brick", "old", "mug"}
        assert set(serve.catalog()) == want
        for kind in ("meta_json", "current_regular_file", "vectors_ann", "owners_npy", "thumbs_bin"):
            serve.stop()
            _damage(tmp_path, kind)
            serve.start()
            assert set(serve.catalog()) == want, kind
            _, health = serve.request("GET", "/api/health", headers=AUTH)
            assert health["enrolled"]["set_aside"], kind
            assert _top(serve, photos, "coffee") == "mug", kind
        names = sorted(p.name for p in (tmp_path / "index").iterdir())
        assert sum(".damaged-" in n for n in names) >= 5, names  # set aside, never deleted
    finally:
        serve.stop()


def test_a_full_disk_answers_507_leaves_nothing_half_written_and_recovers(tmp_path, tmpfs, small_catalog, photos):
    serve = Serve(tmp_path, small_catalog, "recognition:\n  adapt: false\n", state=tmpfs,
                  catalog_extra="  min_free_mb: 1\n  retry_s: 0.5\n")
    try:
        serve.start()
        assert serve.upload("/api/catalog", _jpeg(photos, "coffee"), label="Mug", id="mug")[0] == 202
        _wait(lambda: "mug" in serve.catalog(), 30, "the first enrolment")
        st = os.statvfs(tmpfs)
        filler = tmpfs / "filler"
        with open(filler, "wb") as f:  # leave ~300 KB
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 300_000))
        status, body = serve.upload("/api/catalog", _jpeg(photos, "chelsea"), label="Cat", id="cat")
        assert status == 507 and "free" in body["error"], body
        assert serve.request("DELETE", "/api/catalog/moon", headers=AUTH)[0] == 507
        assert _top(serve, photos, "coffee") == "mug"  # queries keep working
        assert not [p for p in tmpfs.rglob("*") if ".tmp" in p.name], "something half-written was left"
        serve.kill9()
        serve.start()  # a start on a full disk serves what it has
        assert "cat" not in serve.catalog() and "mug" in serve.catalog() and "moon" in serve.catalog()
        filler.unlink()  # space comes back: no restart needed
        assert serve.upload("/api/catalog", _jpeg(photos, "chelsea"), label="Cat", id="cat")[0] == 202
        _wait(lambda: "cat" in serve.catalog(), 30, "the enrolment after space came back")
    finally:
        serve.stop()


def test_secrets_stay_out_of_the_log_health_and_metrics(tmp_path, small_catalog):
    broker_pw, cam_pw = "brokerpw-93f1", "campw-5d2e"
    serve = Serve(tmp_path, small_catalog,
                  "mqtt:\n  enabled: true\n  host: 127.0.0.1\n  port: 9\n  username: u\n  password_env: EDGE_PW\n",
                  camera=f"rtsp://viewer:{cam_pw}@127.0.0.1:9/stream", env={"EDGE_PW": broker_pw})
    try:
        serve.start()
        time.sleep(2.0)  # the camera and the broker fail and are retried (and logged) meanwhile
        for path in ("/api/health", "/api/status"):
            for headers in ({}, AUTH):
                body = str(serve.request("GET", path, headers=headers)[1])
                assert cam_pw not in body and broker_pw not in body and TOKEN not in body, path
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert cam_pw not in metrics and broker_pw not in metrics
    finally:
        serve.stop()
    log = (tmp_path / "log").read_text()
    assert "viewer:***@" in log or "rtsp://" in log
    assert cam_pw not in log and broker_pw not in log and TOKEN not in log


def test_history_snapshots_resume_after_the_disk_had_no_room(tmp_path):
    import sqlite3

    from edge_retrieval.core.config import HistoryConfig
    from edge_retrieval.core.results import LookupResult
    from edge_retrieval.outputs.history import History
    history = History(HistoryConfig(dir=tmp_path / "h"))
    rgb = np.full((64, 64, 3), 120, np.uint8)
    result = LookupResult(results=[], timings_ms={"total": 1.0}, source="upload")

    class FullOnce:  # the history's SQLite connection while the disk is full: the first insert fails as SQLite does
        def __init__(self, db):
            self.db, self.full = db, True

        def execute(self, sql, *args):
            if self.full and sql.lstrip().upper().startswith("INSERT"):
                self.full = False
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.db, name)

        def __enter__(self):
            return self.db.__enter__()

        def __exit__(self, *exc):
            return self.db.__exit__(*exc)

    real = history._db
    history._db = FullOnce(real)
    history.record(result, rgb)  # kept in memory, without its snapshot
    assert not history.entries()[0].has_image
    history.record(result, rgb)  # space is back: stored, with its snapshot, and served
    newest = history.entries()[-1] if history.entries()[-1].n > history.entries()[0].n else history.entries()[0]
    assert newest.has_image and history.image(newest.n)
    history._db = real
    history.close()
    again = History(HistoryConfig(dir=tmp_path / "h"))
    assert any(e.has_image for e in again.entries())
    again.close()

