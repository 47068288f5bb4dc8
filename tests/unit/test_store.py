"""The catalog store and the replay onto the index (in-process, fast): change numbers only grow, no order of
changes, rebuilds, CLI builds and restarts can revert or resurrect an item, older versions' enrolled folders
migrate (damaged files skipped), damaged generations are set aside (never deleted), a second server is refused
naming the holder, the enrolment queue is bounded, and the web layer answers 421 / 400 / 413 / 503 / 507."""
from __future__ import annotations

import io
import json
import os
import shutil
import time

import numpy as np
import pytest

from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.catalog.ids import validate_id
from edge_retrieval.catalog.service import CatalogService, migrate_enrolled_dir
from edge_retrieval.catalog.store import CatalogStore, hold_serve_lock
from edge_retrieval.core.config import CatalogConfig, IndexConfig, RecognitionConfig, WebConfig
from edge_retrieval.core.errors import DiskFullError, InputError, StoreError
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.writer import recover_index, write_index
from edge_retrieval.web import create_app
from tests.conftest import make_appliance
from tests.support.serve import AUTH, TOKEN

CHEAP = RecognitionConfig(adapt=False, enrol_views=[], features=False, verify=False, decision=None,
                          accept_inliers=16, accept_score=0.74)
NAMES = ("coffee", "chelsea", "astronaut", "grace_hopper", "camera", "coins")


@pytest.fixture()
def state(tmp_path, encoder, small_catalog):
    """(config of the catalog section, index config, maker, the folder) over a base generation of three photos."""
    maker = ItemMaker(encoder, CHEAP, 96)
    build_index(small_catalog, maker, tmp_path / "index", n_trees=2, progress=False)
    return (CatalogConfig(store=tmp_path / "catalog.sqlite", enrolled_dir=tmp_path / "enrolled"),
            IndexConfig(path=tmp_path / "index", n_trees=2), maker, small_catalog)


def _service(state, encoder, **catalog) -> CatalogService:
    cfg, index, maker, _ = state
    holder = IndexHolder(index, expected_bundle_sha256=encoder.sha256, create_empty=True, dim=encoder.dim,
                         recover=True)
    return CatalogService(cfg.model_copy(update=catalog), holder, maker)


def test_the_store_numbers_every_change_once_and_keeps_tombstones(tmp_path):
    store = CatalogStore(tmp_path / "s.sqlite")
    seqs = [store.put("a", "A", b"1"), store.put("b", "B", b"2"), store.remove("a"), store.put("a", "A2", b"3")]
    assert seqs == [1, 2, 3, 4] and store.seq() == 4
    rows, top = store.changes_since(2)
    assert [(r.id, r.seq, r.removed, r.label) for r in rows] == [("a", 4, False, "A2")] and top == 4
    store.remove("moon")  # an item of the catalog folder: the tombstone keeps it out of later builds
    assert store.get("moon").removed and store.counts() == {"enrolled": 2, "removed": 1}
    sid = store.id
    store.close()
    again = CatalogStore(tmp_path / "s.sqlite")
    assert again.id == sid and again.seq() == 5
    again.close()
    (tmp_path / "bad.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot be opened.*catalog.store"):
        CatalogStore(tmp_path / "bad.sqlite")


def test_a_second_server_on_the_same_store_is_refused_naming_the_holder(tmp_path):
    fd = hold_serve_lock(tmp_path / "s.sqlite")
    try:
        with pytest.raises(StoreError, match=rf"pid {os.getpid()} on host"):
            hold_serve_lock(tmp_path / "s.sqlite")
    finally:
        os.close(fd)
    os.close(hold_serve_lock(tmp_path / "s.sqlite"))  # free again once the holder is gone


@pytest.mark.parametrize("labels, removed", [(b"", b"[]"), (b'{"a": ', b""), (b"\xff\xfe\x00junk", b"5"),
                                             (b"[]", b'{"x": "t"'), (b'{"ok": "Fine"}', b'{"gone": "2026"}')])
def test_migration_of_an_older_enrolled_dir_survives_damaged_files(tmp_path, photos, labels, removed):
    legacy = tmp_path / "enrolled"
    (legacy / "sub").mkdir(parents=True)
    (legacy / "ok.jpg").write_bytes(encode_jpeg(photos["coffee"]))
    (legacy / "sub" / "two.jpg").write_bytes(encode_jpeg(photos["moon"]))
    (legacy / "labels.json").write_bytes(labels)
    (legacy / "removed.json").write_bytes(removed)
    store = CatalogStore(tmp_path / "s.sqlite")
    report = migrate_enrolled_dir(store, legacy)
    assert report["enrolled"] == 2 and store.get("sub/two").label == "two"
    assert store.get("ok").label == ("Fine" if labels.startswith(b'{"ok"') else "ok")
    assert (store.get("gone") is not None) == removed.startswith(b'{"gone"')
    assert migrate_enrolled_dir(store, legacy) is None  # once


def test_no_order_of_changes_rebuilds_cli_builds_and_restarts_reverts_or_resurrects(state, encoder, photos):
    """A seeded random history of enrolments, re-enrolments, removals, replays, CLI folder builds and restarts
    (a new service: its in-memory queue lost, as after kill -9): the index always ends equal to the store."""
    cfg, index, maker, base = state
    rng = np.random.default_rng(5)
    service = _service(state, encoder)
    want: dict[str, str | None] = {"rocket": "rocket", "moon": "moon", "brick": "brick"}  # id → label, None = removed
    for step in range(40):
        op = rng.choice(["enrol", "enrol", "remove", "apply", "cli_build", "restart"])
        item_id = f"x{int(rng.integers(0, 5))}" if rng.random() < 0.8 else str(rng.choice(["moon", "brick"]))
        if op == "enrol":
            label = f"{item_id} v{step}"
            service.enrol(photos[NAMES[step % len(NAMES)]], item_id, label, replace=True)
            want[item_id] = label
        elif op == "remove":
            if service.remove(item_id) is not None:
                want[item_id] = None
        elif op == "apply":
            service.apply()
        elif op == "cli_build":  # another process: the folder as a new base generation, the store not applied
            build_index(base, maker, index.path, n_trees=2, progress=False)
        else:
            service.stop()
            service = _service(state, encoder)
    service.apply()
    live = {it.id: it.label for it in service.holder.current().items}
    assert live == {i: label for i, label in want.items() if label is not None}
    service.stop()


def test_a_rebuild_reads_current_after_taking_the_lock(state, encoder, photos):
    """High 3: a server rebuild that was waiting for the lock while the CLI built builds on the CLI's
    generation, never on the one it had loaded before."""
    cfg, index, maker, base = state
    service = _service(state, encoder)
    service.enrol(photos["coffee"], "mug", "Mug")
    extra = maker.make(photos["camera"], "cli/new")
    from edge_retrieval.index.writer import build_lock
    with build_lock(index.path):  # the CLI holds the lock and writes its generation...
        write_index(index.path, [extra], bundle_sha256=encoder.sha256, n_trees=2, dim=encoder.dim)
        import threading
        t = threading.Thread(target=service.apply)
        t.start()  # ...while the server's rebuild waits
        time.sleep(0.3)
    t.join(60)
    assert {it.id for it in service.holder.current().items} == {"cli/new", "mug"}
    service.stop()


def test_an_enrolment_right_after_a_cli_build_removed_the_loaded_generation_is_acknowledged(state, encoder, photos):
    """A CLI `index build` makes a newer generation live and removes older ones, the one this server still has
    loaded among them (its worker looks only every few seconds): an enrolment then must not fail on the vanished
    folder — it is acknowledged, and indexed on top of the CLI's generation."""
    cfg, index, maker, base = state
    service = _service(state, encoder)
    loaded = service.holder.current().path
    write_index(index.path, [maker.make(photos["camera"], "cli/new")], bundle_sha256=encoder.sha256, n_trees=2,
                dim=encoder.dim)
    shutil.rmtree(loaded)  # what the CLI's clean-up of old generations does
    assert service.enrol(photos["coffee"], "mug", "Mug")["status"] == "queued"
    service.apply()
    assert {it.id for it in service.holder.current().items} == {"cli/new", "mug"}
    service.stop()


@pytest.mark.parametrize("kind", ["meta.json", "vectors.ann", "thumbs.bin", "owners.npy", "projection.npz",
                                  "current_file", "all"])
def test_damaged_generations_are_set_aside_never_deleted(tmp_path, kind):
    from edge_retrieval.index.reader import CatalogItem
    from edge_retrieval.model.adaptation import Projection
    root = tmp_path / "index"
    items = [CatalogItem(f"i{k}", "l", np.random.default_rng(k).normal(size=(2, 8)).astype(np.float32),
                         b"\xff\xd8thumb") for k in range(3)]
    proj = Projection(mean=np.zeros(8, np.float32), matrix=np.eye(8, dtype=np.float32)[:4], fit_items=3,
                      views_per_item=1, bundle_sha256="s" * 64)
    older = write_index(root, items[:2], bundle_sha256="s" * 64, n_trees=1, projection=proj)
    newer = write_index(root, items, bundle_sha256="s" * 64, n_trees=1, projection=proj)
    for gen in ([older, newer] if kind == "all" else [newer]):
        if kind == "current_file":
            (root / "current").unlink()
            (root / "current").write_text("gen")
        elif kind in ("meta.json", "all"):
            (gen / "meta.json").write_bytes(b'{"format_version": 1,')
        else:
            (gen / kind).write_bytes((gen / kind).read_bytes()[:10])
    aside = recover_index(root)
    names = sorted(p.name for p in root.iterdir())
    if kind == "all":
        assert len(aside) == 2 and not (root / "current").exists()
    elif kind == "current_file":
        assert os.readlink(root / "current") == newer.name and aside[0]["name"] == "current"
    else:
        assert os.readlink(root / "current") == older.name and aside[0]["name"] == newer.name
    assert sum(".damaged-" in n for n in names) == len(aside), names
    assert recover_index(root) == []  # nothing more to do


# ---------------------------------------------------------------------------------------------- the web layer

@pytest.fixture()
def appliance(state, encoder, tmp_path):
    catalog, index, _, _ = state
    app = make_appliance(tmp_path, encoder, recognition=CHEAP, index=index.model_copy(update={"top_k": 3}),
                         catalog=catalog.model_copy(update={"max_pending_enrolments": 1}))
    yield app  # not started: the catalog worker does not run, nothing drains
    app.stop()


def _post(client, url, data: bytes, headers=None, **fields):
    return client.post(url, headers=headers or {}, data={"image": (io.BytesIO(data), "x.jpg"), **fields})


def test_foreign_host_headers_get_421_on_every_route(appliance):
    client = create_app(WebConfig(api_token=TOKEN), appliance).test_client()
    for path in ("/", "/api/health", "/api/catalog", "/metrics", "/api/frame.jpg", "/nope"):
        r = client.get(path, headers={"Host": "evil.example"})
        assert r.status_code == 421 and "web.allowed_hosts" in r.get_json()["error"], path
    assert client.post("/api/lookup", headers={"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
                       ).status_code == 421
    for host in ("localhost", "127.0.0.1:8080", "[::1]:8080", os.uname().nodename):
        assert client.get("/api/health", headers={"Host": host}).status_code in (200, 503), host
    assert client.post("/api/lookup", headers={"Origin": "http://other.example"}).status_code == 403  # Origin too
    mine = create_app(WebConfig(allowed_hosts=["shelf-cam.example.lan"]), appliance).test_client()
    assert mine.get("/api/health", headers={"Host": "SHELF-CAM.example.lan."}).status_code in (200, 503)
    anyone = create_app(WebConfig(allowed_hosts=["*"]), appliance).test_client()
    assert anyone.get("/api/health", headers={"Host": "evil.example"}).status_code in (200, 503)


def test_odd_json_bodies_and_a_3000_part_form_get_a_clear_4xx(appliance):
    client = create_app(WebConfig(api_token=TOKEN), appliance).test_client()
    for body in ("[1, 2]", '"str"', "5", "{broken"):
        r = client.post("/api/catalog/camera", data=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.get_json())
    parts = {f"f{i}": "x" for i in range(3000)}
    r = client.post("/api/query", data={"image": (io.BytesIO(b"x"), "x.jpg"), **parts})  # multipart
    assert r.status_code == 413 and "too many form parts" in r.get_json()["error"]


def test_enrolments_beyond_the_queue_get_503_and_a_full_disk_507(appliance, photos, monkeypatch):
    client = create_app(WebConfig(api_token=TOKEN), appliance).test_client()
    assert _post(client, "/api/catalog", encode_jpeg(photos["coffee"]), AUTH, label="a", id="a").status_code == 202
    r = _post(client, "/api/catalog", encode_jpeg(photos["chelsea"]), AUTH, label="b", id="b")
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert "catalog.max_pending_enrolments" in r.get_json()["error"]
    assert appliance.catalog.store.get("b") is None  # nothing acknowledged, nothing kept
    appliance.catalog.apply()  # the queue drains
    import edge_retrieval.catalog.service as service_mod

    def full(path, need, reserve):
        raise DiskFullError(f"only 0.1 MB free on the disk of {path}")

    monkeypatch.setattr(service_mod, "ensure_free", full)
    r = _post(client, "/api/catalog", encode_jpeg(photos["chelsea"]), AUTH, label="b", id="b")
    assert r.status_code == 507 and "free" in r.get_json()["error"]
    assert client.delete("/api/catalog/a", headers=AUTH).status_code == 507
    assert appliance.catalog.store.get("b") is None and not appliance.catalog.store.get("a").removed
    assert _post(client, "/api/query", encode_jpeg(photos["coffee"])).status_code == 200
    assert json.loads(client.get("/api/health", headers=AUTH).data)["enrolled"]["pending"] == 0


@pytest.mark.parametrize("bad", ["ok\n/x", "ok/x\n", "ok\n", "ok\r\n/x", "ok/\n"])
def test_an_id_with_a_line_break_is_refused_even_at_the_end_of_a_part(bad):
    assert validate_id("ok/x") == "ok/x"
    with pytest.raises(InputError, match="invalid catalog id"):
        validate_id(bad)


def test_a_store_of_the_previous_schema_is_read_and_gains_the_attributes_column(tmp_path):
    """A catalog.sqlite written before attributes (schema 1) opens, keeps its rows and takes attributes after."""
    import sqlite3
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE items (id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, removed INTEGER NOT NULL, label TEXT,
                            image BLOB, changed TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1'), ('store_id', 'abc'), ('seq', '1');
        INSERT INTO items VALUES ('mug', 1, 0, 'Mug', x'ffd8ff', '2026-01-01T00:00:00Z');
    """)
    db.commit()
    db.close()
    store = CatalogStore(path)
    try:
        assert store.meta("schema") == "2" and store.id == "abc"
        assert store.get("mug").label == "Mug" and store.get("mug").attributes == {}
        store.put("mug#side", "Mug", b"\xff\xd8\xff", attributes={"sku": "M-1"})
        assert store.get("mug#side").attributes == {"sku": "M-1"} and store.photo_keys("mug") == ["mug", "mug#side"]
        assert store.photo_keys("mu") == []  # a prefix of an id is not its item
    finally:
        store.close()
