"""The store and the index agree on where the catalog stands, whatever a restore or a lost file does: an older
``catalog.sqlite`` restored (what the store's own error message suggests) re-derives the index from it and every
later change is indexed — never a 202 that the index already claims; a missing or 0-byte store beside an index
made from a store is refused at start with a message that says what to do, and nothing is created over it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.catalog.service import CatalogService
from edge_retrieval.core.config import CatalogConfig, IndexConfig, RecognitionConfig
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import StoreError
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.index.holder import IndexHolder

CHEAP = RecognitionConfig(adapt=False, enrol_views=[], features=False, verify=False, decision=None,
                          accept_inliers=16, accept_score=0.74)


@pytest.fixture()
def state(tmp_path, encoder, photos) -> tuple[CatalogConfig, IndexConfig, ItemMaker]:
    """The catalog and index sections read from a YAML file, over a base generation of two photos."""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("rocket", "moon"):
        (base / f"{name}.jpg").write_bytes(encode_jpeg(photos[name]))
    (tmp_path / "config.yaml").write_text(f"catalog:\n  store: {tmp_path / 'catalog.sqlite'}\n"
                                          f"  enrolled_dir: {tmp_path / 'enrolled'}\n"
                                          f"index:\n  path: {tmp_path / 'index'}\n  n_trees: 2\n")
    cfg = load_config(tmp_path / "config.yaml")
    maker = ItemMaker(encoder, CHEAP, 96)
    build_index(base, maker, cfg.index.path, n_trees=2, progress=False)
    return cfg.catalog, cfg.index, maker


def _service(state, encoder) -> CatalogService:
    catalog, index, maker = state
    holder = IndexHolder(index, expected_bundle_sha256=encoder.sha256, create_empty=True, dim=encoder.dim,
                         recover=True)
    return CatalogService(catalog, holder, maker)


def _ids(service: CatalogService) -> set[str]:
    return {it.id for it in service.holder.current().items}


def _files(store: Path) -> list[Path]:
    return [store, Path(f"{store}-wal"), Path(f"{store}-shm")]


def test_an_older_store_restored_from_a_backup_re_derives_the_index_and_indexes_every_new_change(state, encoder,
                                                                                               photos, tmp_path):
    store = state[0].store
    service = _service(state, encoder).start()
    service.enrol(photos["coffee"], "mug", "Mug")
    service.apply()
    service.stop()  # closed: the WAL is checkpointed into the file, which is now a consistent backup
    backup = tmp_path / "backup.sqlite"
    shutil.copy(store, backup)

    service = _service(state, encoder).start()
    service.enrol(photos["chelsea"], "cat", "Cat")
    service.enrol(photos["astronaut"], "astro", "Astronaut")
    service.remove("rocket")
    service.apply()
    assert _ids(service) == {"moon", "mug", "cat", "astro"}
    assert service.merge()  # a new base generation that claims change 4 (before that, only the delta held it)
    index_seq = service.applied_seq()
    service.stop()

    for f in _files(store):
        f.unlink(missing_ok=True)
    shutil.copy(backup, store)  # the restore: the store is back at change 1, the index's base holds change 4

    service = _service(state, encoder).start()
    went_back = service.health().store_went_back
    assert went_back is not None and went_back["store_seq"] == 1 and went_back["index_seq"] == index_seq
    assert "re-derived" in went_back["why"]
    assert service.store.meta("went_back") is not None  # kept for whoever looks later
    assert service.applied_seq() == service.store.seq()  # the whole store was replayed onto the index
    seq = service.enrol(photos["grace_hopper"], "grace", "Grace")["seq"]
    assert service.wait_applied(seq, 60)
    assert "grace" in _ids(service)  # indexed: not a 202 the index already claimed
    seq = service.remove("cat")  # known to the index only: its removal is still applied
    assert service.wait_applied(seq, 60) and "cat" not in _ids(service)
    service.stop()

    service = _service(state, encoder).start()  # a restart after that: nothing went back any more
    assert service.health().store_went_back is None
    assert {"grace", "mug", "moon"} <= _ids(service) and "cat" not in _ids(service)
    service.stop()


@pytest.mark.parametrize("how", ["zero_bytes", "missing"])
def test_a_lost_store_beside_an_index_made_from_it_is_refused_and_nothing_is_created(state, encoder, photos, how):
    store = state[0].store
    service = _service(state, encoder).start()
    service.enrol(photos["coffee"], "mug", "Mug")
    service.apply()
    service.stop()
    for f in _files(store):
        f.unlink(missing_ok=True)
    if how == "zero_bytes":
        store.write_bytes(b"")
    with pytest.raises(StoreError, match="Restore catalog.store from a backup") as e:
        _service(state, encoder)
    assert ("empty (0 bytes)" if how == "zero_bytes" else "missing") in str(e.value)
    assert (store.stat().st_size == 0) if how == "zero_bytes" else not store.exists()  # nothing written over it


def test_a_restore_before_the_next_merge_is_noticed_and_gives_the_restored_catalog(state, encoder, photos, tmp_path):
    """Changes not merged yet live in the delta, derived from the store; the index folder's store mark still says
    which change the index had taken, so a restored older store is noticed (health) and the index follows it."""
    store = state[0].store
    service = _service(state, encoder).start()
    service.enrol(photos["coffee"], "mug", "Mug")
    service.apply()
    service.stop()
    backup = tmp_path / "backup.sqlite"
    shutil.copy(store, backup)
    service = _service(state, encoder).start()
    service.enrol(photos["chelsea"], "cat", "Cat")
    service.remove("rocket")
    service.apply()
    assert _ids(service) == {"moon", "mug", "cat"}
    service.stop()
    for f in _files(store):
        f.unlink(missing_ok=True)
    shutil.copy(backup, store)
    service = _service(state, encoder).start()
    went_back = service.health().store_went_back
    assert went_back is not None and went_back["store_seq"] == 1 and went_back["index_seq"] == 3
    assert _ids(service) == {"moon", "mug", "rocket"}  # the restored catalog, exactly
    seq = service.enrol(photos["grace_hopper"], "grace", "Grace")["seq"]
    assert service.wait_applied(seq, 60) and "grace" in _ids(service)
    service.stop()
