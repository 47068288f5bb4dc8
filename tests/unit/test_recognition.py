"""Recognise, don't just rank: multi-view enrolment + spatial verification + a calibrated "no match",
on real photos with generated camera views (fixed seeds)."""
from __future__ import annotations

import numpy as np
import pytest

from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.core.config import IndexConfig, RecognitionConfig
from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.index.generation import FEATURES_FILE
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.reader import CatalogIndex
from edge_retrieval.search.lookup import Lookup
from tests.conftest import CATALOG, view

ENROL = RecognitionConfig(enrol_views=[0.7, 0.55], features=True)
VERIFIED = RecognitionConfig(verify=True, verify_top_k=5)  # the shipped learned decision
THRESHOLDS = VERIFIED.model_copy(update={"decision": None})  # its fallback: accept_inliers / accept_score
DECISIONS = pytest.mark.parametrize("rc", [VERIFIED, THRESHOLDS], ids=["learned", "thresholds"])
GLOBAL_ONLY = RecognitionConfig(verify=False)
SINGLE_VIEW = RecognitionConfig(enrol_views=[], features=False, adapt=False)  # issue 5: no adaptation either


def maker(encoder, recognition=ENROL) -> ItemMaker:
    return ItemMaker(encoder, recognition, 160)


def holder_of(path, encoder) -> IndexHolder:
    return IndexHolder(IndexConfig(path=path, search_k=5000), expected_bundle_sha256=encoder.sha256,
                       require_features=True)


@pytest.fixture(scope="module")
def recog_index(tmp_path_factory, catalog_dir, encoder):
    path = tmp_path_factory.mktemp("recog") / "index"
    build_index(catalog_dir, maker(encoder), path, n_trees=10, progress=False)
    return path


@pytest.fixture(scope="module")
def single_view_index(tmp_path_factory, catalog_dir, encoder):
    """The issue-5 baseline: one vector per item, no features."""
    path = tmp_path_factory.mktemp("single") / "index"
    build_index(catalog_dir, maker(encoder, SINGLE_VIEW), path, n_trees=10, progress=False)
    with CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256, search_k=5000) as idx:
        yield idx


@pytest.fixture(scope="module")
def index(recog_index, encoder):
    with CatalogIndex.load(recog_index, expected_bundle_sha256=encoder.sha256, search_k=5000,
                           require_features=True) as idx:
        yield idx


def truth(name: str) -> str:
    return "space" if name == "hubble_deep_field" else name  # a sub-folder is one item of photos


@pytest.fixture(scope="module")
def table_views(photos):
    return [(truth(n), view(photos, n, kind, seed=300 + 10 * i + s))
            for i, n in enumerate(CATALOG) for kind in ("table", "table_occluded") for s in range(3)]


def test_verification_beats_global_only_on_table_views(encoder, index, single_view_index, table_views):
    glob = Lookup(encoder, single_view_index, GLOBAL_ONLY, top_k=5)
    ver = Lookup(encoder, index, VERIFIED, top_k=5)  # the open bundle's calibrated decision and thresholds
    g = [glob.lookup_rgb(v).results[0].id == t for t, v in table_views]
    r = [ver.lookup_rgb(v) for _, v in table_views]
    vtop = [res.results[0].id == t for (t, _), res in zip(table_views, r)]
    assert sum(vtop) > sum(g), (sum(vtop), sum(g))
    # a view global-only ranks below first (but within the verified top-K) comes first after verification
    rescued = [i for i, (a, b) in enumerate(zip(g, vtop)) if b and not a]
    assert rescued, "no view was rescued by verification"
    res = r[rescued[0]]
    assert res.match is not None and res.match.id == table_views[rescued[0]][0]
    assert res.match.inliers >= ver.accept_inliers
    assert sum(vtop) >= len(table_views) - 3  # ≥ 81/84 table + occluded-table views first


@DECISIONS
def test_not_in_catalog_and_empty_table_give_no_match(encoder, index, photos, rc):
    from edge_retrieval.imaging.synthetic_views import empty_table
    lookup = Lookup(encoder, index, rc, top_k=5)
    negatives = [view(photos, name, kind, seed=7 + i) for i, name in enumerate(("coffee", "grace_hopper"))
                 for kind in ("closeup", "table", "perspective")]
    negatives += [empty_table(np.random.default_rng(s)) for s in range(3)]
    for i, frame in enumerate(negatives):
        result = lookup.lookup_rgb(frame)
        assert result.match is None, (i, result.match, result.results[:2])
        assert result.results  # nearest candidates are still shown (greyed out by the page)


@DECISIONS
def test_closeups_of_catalog_items_are_accepted(encoder, index, photos, rc):
    lookup = Lookup(encoder, index, rc, top_k=5)
    for i, name in enumerate(CATALOG):
        result = lookup.lookup_rgb(view(photos, name, "closeup", seed=200 + i))
        assert result.match is not None and result.match.id == truth(name), (name, result.results[:2])


def test_multi_view_items_return_each_item_once(encoder, index, photos):
    assert index.size == len(CATALOG) and len(index.vectors()) == 3 * len(CATALOG)
    res = Lookup(encoder, index, GLOBAL_ONLY, top_k=10).lookup_rgb(photos["rocket"])
    ids = [c.id for c in res.results]
    assert len(ids) == len(set(ids)) == 10 and ids[0] == "rocket"


def test_enrol_and_remove_keep_vectors_features_and_ids_consistent(tmp_path, recog_index, encoder, photos):
    import shutil
    path = tmp_path / "index"
    shutil.copytree(recog_index, path, symlinks=True)
    holder = holder_of(path, encoder)
    n = holder.current().size
    holder.add([maker(encoder).make(photos["coffee"], "mug", "Mug")])
    idx = holder.current()
    assert idx.size == n + 1 and len(idx.vectors()) == 3 * (n + 1)
    assert idx.features("mug") is not None and len(idx.features("mug")) > 100
    moon_before = idx.features("moon").desc.copy()
    holder.remove(["mug", "chelsea"])
    idx = holder.current()
    assert idx.size == n - 1 and len(idx.vectors()) == 3 * (n - 1) and not idx.has("mug")
    assert np.array_equal(idx.features("moon").desc, moon_before)  # features stayed with their item
    from edge_retrieval.index.feature_store import FeatureStore
    with FeatureStore.open(idx.path / FEATURES_FILE) as store:
        assert len(store) == idx.size  # no orphan features
    holder.close()


def test_crash_during_rebuild_leaves_old_index_and_features_usable(tmp_path, recog_index, encoder, photos,
                                                                   monkeypatch):
    import shutil

    from edge_retrieval.index.feature_store import FeatureWriter
    path = tmp_path / "index"
    shutil.copytree(recog_index, path, symlinks=True)
    holder = holder_of(path, encoder)
    before = holder.current().generation

    def boom(*a, **k):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(FeatureWriter, "add", boom)  # the disk fills up as the features stream in
    with pytest.raises(CatalogIndexError, match="disk full"):
        holder.add([maker(encoder).make(photos["coffee"], "mug", "Mug")])
    monkeypatch.undo()
    fresh = CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256, require_features=True)
    assert fresh.generation == before and not fresh.has("mug")
    res = Lookup(encoder, fresh, VERIFIED, top_k=5).lookup_rgb(view(photos, "rocket", "table", seed=3))
    assert res.match is not None and res.match.id == "rocket" and res.match.inliers > 0
    holder.close()


def test_missing_or_corrupt_features_file(tmp_path, recog_index, encoder, photos):
    import shutil
    path = tmp_path / "index"
    shutil.copytree(recog_index, path, symlinks=True)
    feats = path / "current" / FEATURES_FILE
    feats.write_bytes(feats.read_bytes()[:1000])
    with pytest.raises(CatalogIndexError, match=FEATURES_FILE):
        CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256, require_features=True)
    idx = CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256, require_features=False)
    lookup = Lookup(encoder, idx, VERIFIED, top_k=5)
    status = lookup.verification_status()
    assert status["enabled"] is False and FEATURES_FILE in status["why"]
    res = lookup.lookup_rgb(view(photos, "rocket", "closeup", seed=1))
    assert res.results[0].id == "rocket" and "verify" not in res.timings_ms  # global-only, still serving
    feats.unlink()
    with pytest.raises(CatalogIndexError, match=f"{FEATURES_FILE}.*No such file"):
        CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256, require_features=True)


def test_retry_crops_look_closer_only_when_the_whole_frame_gives_no_match(encoder, index, photos):
    """``retry_crops``: a lookup that matched at once encodes one image; one that did not encodes the crops too
    and decides again (an empty table still gives no match)."""
    lookup = Lookup(encoder, index, VERIFIED.model_copy(update={"retry_crops": [0.7]}), top_k=5)
    calls = []
    real = encoder.embed

    class Counting:  # the shared encoder, counting its encodes
        def __getattr__(self, name):
            return getattr(encoder, name)

        def embed(self, rgb):
            calls.append(rgb.shape)
            return real(rgb)

    lookup.encoder = Counting()
    matched = lookup.lookup_rgb(view(photos, "rocket", "closeup", seed=3))
    assert matched.match is not None and matched.match.id == "rocket" and len(calls) == 1
    calls.clear()
    from edge_retrieval.imaging.synthetic_views import empty_table
    table = lookup.lookup_rgb(empty_table(np.random.default_rng(4)))
    assert table.match is None and len(calls) == 2 and calls[1][0] == int(480 * 0.7)
