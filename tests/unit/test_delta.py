"""The base generation + the delta (edge_retrieval/index/delta.py): the same answers as a full rebuild, the encoded copy
of an item kept in the store (edge_retrieval/index/encoded_item.py), and the catalog service putting changes into the
delta without writing a generation, bringing it back after a restart without the model, and merging it while
enrolments go on."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.catalog.service import CatalogService
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import CatalogIndexError, DiskFullError
from edge_retrieval.index.delta import DeltaChange, LiveIndex
from edge_retrieval.index.encoded_item import decode_item, encode_item
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.reader import CatalogIndex, CatalogItem, read_current_name
from edge_retrieval.index.writer import write_index
from edge_retrieval.model.local_features import Features
from tests.conftest import OPEN_BUNDLE, view

N, DIM, SHA = 300, 64, "a" * 64


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _item(i: int, v: np.ndarray, label: str | None = None) -> CatalogItem:
    return CatalogItem(f"item-{i:04d}", label or f"Label {i}", v, b"\xff\xd8%d\xff\xd9" % i, f"/p/{i}.jpg")


def _load(path: Path) -> CatalogIndex:
    return CatalogIndex.load(path, expected_bundle_sha256=SHA, search_k=100_000)  # exhaustive: exact answers


def test_base_plus_delta_answers_what_a_full_rebuild_answers(tmp_path):
    """Enrolments, re-enrolments (new vectors and labels) and removals in the delta: the top 10 of 60 queries —
    ids, order and cosines — equal those of a generation rebuilt with the same catalog; several views per item."""
    rng = np.random.default_rng(0)
    views = _unit(rng.standard_normal((N + 40, 2, DIM)))
    base_items = [_item(i, views[i]) for i in range(N)]
    base = _load(write_index(tmp_path / "base", base_items, bundle_sha256=SHA, n_trees=10, store=("S", 5)).parent)
    live = LiveIndex(base, seq=5, store_id="S")
    changes = [DeltaChange(f"item-{i:04d}", 6 + i - N, _item(i, views[i]), keep_item=True) for i in range(N, N + 40)]
    moved = {i: _item(i, _unit(views[i] + 0.5 * rng.standard_normal((2, DIM))), f"Moved {i}") for i in range(0, 30, 3)}
    changes += [DeltaChange(it.id, 100 + i, it, keep_item=True) for i, it in moved.items()]
    removed = [f"item-{i:04d}" for i in range(1, 30, 3)] + ["item-0301"]  # one removal of a delta item
    changes += [DeltaChange(r, 200 + k, None) for k, r in enumerate(removed)]
    half = len(changes) // 2
    live = live.with_changes(changes[:half], 150).with_changes(changes[half:], 300)

    final = {it.id: it for it in base_items}
    final.update({it.id: it for it in (c.item for c in changes if c.item is not None)})
    for r in removed:
        final.pop(r)
    rebuilt = _load(write_index(tmp_path / "rebuilt", final.values(), bundle_sha256=SHA, n_trees=10).parent)
    assert live.size == rebuilt.size == len(final) and live.store_seq == ("S", 300)
    assert sorted((it.id, it.label) for it in live.items) == sorted((it.id, it.label) for it in rebuilt.items)
    queries = _unit(np.concatenate([views[N - 10:N + 40, 0], views[:10, 1]]) + 0.1 * rng.standard_normal((60, DIM)))
    for q in queries:
        got, want = live.query(q, 10), rebuilt.query(q, 10)
        assert [c.id for c in got] == [c.id for c in want]
        np.testing.assert_allclose([c.score for c in got], [c.score for c in want], atol=2e-5)
        assert [c.label for c in got] == [c.label for c in want]
    assert not live.has("item-0001") and live.has("item-0003") and live.item("item-0003").label == "Moved 3"
    assert live.thumbnail("item-0310") == b"\xff\xd8310\xff\xd9" and live.thumbnail("item-0002") == b"\xff\xd82\xff\xd9"
    with pytest.raises(CatalogIndexError):
        live.item("item-0301")
    # a new base holding the changes up to 150: the delta keeps only what came after, answers unchanged
    merged = _load(write_index(tmp_path / "base", live.with_changes([], 150).stored_items(), bundle_sha256=SHA,
                               n_trees=10, store=("S", 150)).parent)
    rebased = live.rebased(merged)
    assert rebased.delta_size == len([c for c in changes if c.seq > 150]) and rebased.store_seq == ("S", 300)
    for q in queries[:20]:
        assert [c.id for c in rebased.query(q, 10)] == [c.id for c in rebuilt.query(q, 10)]


def test_an_encoded_item_comes_back_whole_and_a_damaged_or_foreign_one_is_refused():
    rng = np.random.default_rng(1)
    feats = Features(rng.random((7, 2), np.float32), rng.integers(0, 255, (7, 32), np.uint8), (320, 240))
    item = CatalogItem("shelf/mug#side", "Mug ☕", _unit(rng.standard_normal((3, DIM))), b"\xff\xd8jpeg\xff\xd9", None,
                       feats, {"sku": "M-1", "price": "3,50 €"})
    data = encode_item(item, SHA)
    back = decode_item(data, SHA)
    assert (back.id, back.label, back.source, back.thumbnail_jpeg) == (item.id, item.label, None, item.thumbnail_jpeg)
    assert back.attributes == item.attributes
    np.testing.assert_allclose(back.vector, item.vector, atol=1e-3)
    assert np.array_equal(back.features.desc, feats.desc) and back.features.size_wh == (320, 240)
    bare = decode_item(encode_item(CatalogItem("x", "x", item.vector[0]), SHA), SHA)
    assert bare.features is None and bare.thumbnail_jpeg is None
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    for bad, why in ((bytes(damaged), "checksum"), (data[:40], "cut short|checksum"), (b"nonsense: not an item", "format")):
        with pytest.raises(CatalogIndexError, match=why):
            decode_item(bad, SHA)
    with pytest.raises(CatalogIndexError, match="another|made with bundle"):
        decode_item(data, "b" * 64)


def _config(tmp_path: Path, merge_after: int):
    f = tmp_path / "config.yaml"
    f.write_text(f"encoder:\n  bundle: {OPEN_BUNDLE}\n"
                 f"index:\n  path: {tmp_path / 'index'}\n  n_trees: 2\n  merge_after_items: {merge_after}\n"
                 f"catalog:\n  store: {tmp_path / 'catalog.sqlite'}\n  enrolled_dir: {tmp_path / 'enrolled'}\n"
                 "recognition:\n  adapt: false\n  enrol_views: []\n  verify: false\n  decision: null\n"
                 "  accept_inliers: 16\n  accept_score: 0.74\n")
    return load_config(f)


@pytest.fixture()
def made(tmp_path, encoder, small_catalog):
    """(config, maker) over a base generation of three photos built from a folder, as `index build` does."""
    cfg = _config(tmp_path, merge_after=3)
    maker = ItemMaker(encoder, cfg.recognition, 96)
    build_index(small_catalog, maker, cfg.index.path, n_trees=2, progress=False)
    return cfg, maker


def _service(cfg, encoder, maker) -> CatalogService:
    holder = IndexHolder(cfg.index, expected_bundle_sha256=encoder.sha256, dim=encoder.dim)
    return CatalogService(cfg.catalog, holder, maker)


def _top(service: CatalogService, encoder, photos, name: str, seed: int = 3) -> str:
    return service.holder.current().query(encoder.embed(view(photos, name, "closeup", seed=seed)), 1)[0].id


def _generations(cfg) -> list[str]:
    return sorted(p.name for p in Path(cfg.index.path).iterdir() if p.name.startswith("gen-"))


def test_changes_go_to_the_delta_and_come_back_after_a_restart_without_the_model(made, encoder, photos, monkeypatch):
    cfg, maker = made
    service = _service(cfg, encoder, maker)
    service.apply()  # the folder build is not from this store: merged once, stamped with it
    gens = _generations(cfg)
    service.enrol(photos["coffee"], "mug", "Mug")
    service.remove("moon")
    service.apply()
    idx = service.holder.current()
    assert _generations(cfg) == gens and idx.generation == read_current_name(cfg.index.path)  # nothing rewritten
    assert (idx.delta_items, idx.delta_removed, idx.base.size, idx.size) == (1, 1, 3, 3)
    assert _top(service, encoder, photos, "coffee") == "mug" and not idx.has("moon")
    assert len(idx.features("mug")) > 100 and idx.thumbnail("mug")[:2] == b"\xff\xd8"  # read back from the store
    health = service.index_health()
    assert (health.base_size, health.delta_items, health.delta_removed, health.merge_after_items) == (3, 1, 1, 3)
    service.stop()

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    import edge_retrieval.catalog.service as service_mod
    monkeypatch.setattr(ItemMaker, "make", no_model)
    monkeypatch.setattr(service_mod, "APPLY_BATCH", 1)  # the delta comes back a batch at a time
    service = _service(cfg, encoder, maker)  # a restart (its memory lost, as after kill -9)
    service.apply()
    assert _top(service, encoder, photos, "coffee") == "mug" and not service.holder.current().has("moon")
    assert service.holder.current().thumbnail("mug")[:2] == b"\xff\xd8" and len(service.holder.current().features("mug"))
    service.stop()

    with sqlite3.connect(cfg.catalog.store) as db:  # a damaged encoded copy: encoded again from the original
        data = bytearray(db.execute("SELECT data FROM encoded WHERE id = 'mug'").fetchone()[0])
        data[len(data) // 2] ^= 0xFF
        db.execute("UPDATE encoded SET data = ? WHERE id = 'mug'", (bytes(data),))
    monkeypatch.undo()
    service = _service(cfg, encoder, maker)
    service.apply()
    assert _top(service, encoder, photos, "coffee") == "mug" and service.holder.current().item("mug").label == "Mug"
    assert decode_item(service.store.encoded("mug", service.store.get("mug").seq), encoder.sha256).id == "mug"
    assert [(d["id"], "checksum" in d["why"]) for d in service.health().damaged_encodings] == [("mug", True)]
    service.stop()


def test_a_merge_folds_the_delta_into_a_new_base_while_enrolments_go_on(made, encoder, photos, monkeypatch):
    cfg, maker = made
    service = _service(cfg, encoder, maker)
    service.apply()
    service.enrol(photos["coffee"], "mug", "Mug")
    service.enrol(photos["chelsea"], "cat", "Cat")
    service.remove("moon")
    service.apply()
    assert service.merge_due()
    inside, release = threading.Event(), threading.Event()
    plan = CatalogService._plan

    def slow_plan(self, cur, report):  # the merge stops after its first item until released
        planned = plan(self, cur, report)
        if planned is None:
            return None

        def items():
            for n, it in enumerate(planned[0]):
                if n == 1:
                    inside.set()
                    release.wait(60)
                yield it
        return items(), planned[1]

    monkeypatch.setattr(CatalogService, "_plan", slow_plan)
    merging = threading.Thread(target=service.merge)
    merging.start()
    assert inside.wait(60) and service.merging and service.index_health().merging
    service.enrol(photos["astronaut"], "astro", "Astronaut")  # during the merge: searchable at once
    service.remove("brick")
    service.apply()
    assert _top(service, encoder, photos, "astronaut") == "astro" and not service.holder.current().has("brick")
    release.set()
    merging.join(60)
    idx = service.holder.current()
    assert service.last_merge["items"] == 4 and idx.base.has("cat") and idx.base.has("mug")
    assert (idx.delta_items, idx.delta_removed) == (1, 1)  # what came during the merge stays in the delta
    assert sorted(it.id for it in idx.items) == ["astro", "cat", "mug", "rocket"]
    assert _top(service, encoder, photos, "coffee") == "mug" and _top(service, encoder, photos, "astronaut") == "astro"
    with sqlite3.connect(cfg.catalog.store) as db:  # merged encodings are dropped, the delta's kept
        assert sorted(r[0] for r in db.execute("SELECT id FROM encoded")) == ["astro"]
    service.stop()


def test_a_merge_without_the_space_for_a_generation_leaves_base_and_delta_serving(made, encoder, photos,
                                                                                   monkeypatch):
    import edge_retrieval.catalog.service as service_mod
    cfg, maker = made
    service = _service(cfg, encoder, maker)
    service.apply()
    service.enrol(photos["coffee"], "mug", "Mug")
    service.apply()
    gens = _generations(cfg)
    real = service_mod.ensure_free

    def full(path, need, reserve):
        if Path(path) == Path(cfg.index.path):
            raise DiskFullError(f"only 0.1 MB free on the disk of {path}")
        real(path, need, reserve)

    monkeypatch.setattr(service_mod, "ensure_free", full)
    with pytest.raises(DiskFullError):
        service.merge()
    assert "free" in service.index_health().merge_error and _generations(cfg) == gens
    assert _top(service, encoder, photos, "coffee") == "mug"
    service.enrol(photos["chelsea"], "cat", "Cat")  # a change itself still fits
    service.apply()
    monkeypatch.undo()
    assert service.merge() and service.index_health().merge_error is None
    assert service.holder.current().delta_size == 0 and service.holder.current().base.has("cat")
    service.stop()


def test_a_new_appliance_verifies_what_it_enrolled_before_any_merge(tmp_path, encoder, photos):
    """A fresh appliance's base is empty and every enrolment lives in the delta: spatial verification uses the
    delta items' own features (it was off until the first merge, so a catalog of < merge_after_items photos was
    never verified)."""
    from edge_retrieval.core.config import RecognitionConfig
    from edge_retrieval.search.lookup import Lookup
    (tmp_path / "config.yaml").write_text(f"catalog:\n  store: {tmp_path / 'catalog.sqlite'}\n"
                                          f"index:\n  path: {tmp_path / 'index'}\n  n_trees: 2\n")
    cfg = load_config(tmp_path / "config.yaml")
    rc = RecognitionConfig(adapt=False, decision=None)
    holder = IndexHolder(cfg.index, expected_bundle_sha256=encoder.sha256, create_empty=True, dim=encoder.dim)
    service = CatalogService(cfg.catalog, holder, ItemMaker(encoder, rc, 96))
    service.apply()
    for name in ("chelsea", "rocket"):
        service.enrol(photos[name], name, name.title())
    service.apply()
    live = holder.current()
    assert live.base.size == 0 and live.delta_size == 2 and live.has_features
    result = Lookup(encoder, holder, rc, top_k=3).lookup_rgb(view(photos, "chelsea", "perspective", seed=2))
    assert result.match is not None and result.match.id == "chelsea" and result.match.inliers >= 8
    service.stop()
