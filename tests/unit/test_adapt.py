"""Catalog adaptation (edge_retrieval/model/adaptation.py): learned whitening fitted at index build on synthetic views of the
catalog's own real photos, stored with the generation, carried over by enrolment, refused for another bundle."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edge_retrieval.app.wiring import build_catalog
from edge_retrieval.catalog.build import ItemMaker
from edge_retrieval.core.config import BuildConfig, Config, IndexConfig, RecognitionConfig
from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.imaging.shipped_photos import photo_crops
from edge_retrieval.imaging.synthetic_views import camera_view
from edge_retrieval.index.generation import PROJECTION_FILE, save_projection
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.reader import CatalogIndex
from edge_retrieval.index.writer import write_index
from edge_retrieval.model.adaptation import Projection, fit_lw
from edge_retrieval.search.lookup import Lookup
from tests.conftest import CATALOG, view

GLOBAL = dict(features=False, verify=False)
ADAPTED = RecognitionConfig(adapt=True, **GLOBAL)
PLAIN = RecognitionConfig(adapt=False, **GLOBAL)
KINDS = ("table", "table_occluded", "perspective", "occluded")


def _truth(name: str) -> str:
    return "space" if name == "hubble_deep_field" else name  # a sub-folder is one item of photos


@pytest.fixture(scope="module")
def crops(photos):
    """A harder catalog than whole photos: 3 crops of each catalog photo (hard negatives of each other)."""
    return photo_crops({n: photos[n] for n in CATALOG}, per_photo=3, seed=1)


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory, crops):
    d = tmp_path_factory.mktemp("crops")
    for name, rgb in crops.items():
        (d / f"{name}.jpg").write_bytes(encode_jpeg(rgb, 92))
    return d


def _build(tmp_path_factory, folder, encoder, rc: RecognitionConfig):
    """`index build` of ``folder`` with ``rc``, as the device wires it (in process)."""
    path = tmp_path_factory.mktemp("adapt") / "index"
    rep = build_catalog(Config(recognition=rc, build=BuildConfig(workers=1)), encoder, folder, path)
    return path, rep


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, crops_dir, encoder):
    return _build(tmp_path_factory, crops_dir, encoder, ADAPTED)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, crops_dir, encoder):
    return _build(tmp_path_factory, crops_dir, encoder, PLAIN)[0]


@pytest.fixture(scope="module")
def hard_views(crops):
    # Seeds differ from the build's (which seeds its views by catalog row): queries are not the fit's views.
    names = sorted(crops)
    return [(n, camera_view(crops[n], kind, np.random.default_rng(900 + 10 * i + k)))
            for i, n in enumerate(names) for k, kind in enumerate(KINDS)]


def _top1(encoder, path, rc, views) -> int:
    with CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256, search_k=5000) as idx:
        lookup = Lookup(encoder, idx, rc, top_k=1)
        return sum(lookup.lookup_rgb(v).results[0].id == t for t, v in views)


def test_build_fits_and_stores_the_projection(adapted, encoder):
    path, rep = adapted
    assert rep.adapted == {"enabled": True, "method": "learned whitening (Lw)", "in_dim": encoder.dim,
                           "dim": min(256, encoder.dim), "fit_items": 3 * len(CATALOG), "views_per_item": 8}
    with CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256) as idx:
        assert idx.projection is not None and idx.projection.bundle_sha256 == encoder.sha256
        assert idx.vectors().shape[1] == encoder.dim  # vectors.npy keeps the bundle's descriptors


def test_adaptation_ranks_camera_views_better_than_the_plain_descriptor(adapted, plain, encoder, hard_views):
    with_adapt = _top1(encoder, adapted[0], ADAPTED, hard_views)
    without = _top1(encoder, plain, PLAIN, hard_views)
    assert with_adapt > without, (with_adapt, without)


def test_enrolment_keeps_the_projection_and_finds_the_new_item(tmp_path, adapted, encoder, photos):
    path = tmp_path / "index"
    shutil.copytree(adapted[0], path, symlinks=True)
    holder = IndexHolder(IndexConfig(path=path, search_k=5000), expected_bundle_sha256=encoder.sha256)
    before = holder.current().projection
    holder.add([ItemMaker(encoder, ADAPTED, 160).make(photos["coffee"], "mug", "Mug")])
    after = holder.current()
    assert after.has("mug") and after.projection is not None
    assert np.array_equal(after.projection.matrix, before.matrix) and np.array_equal(after.projection.mean, before.mean)
    res = Lookup(encoder, holder, ADAPTED, top_k=3).lookup_rgb(view(photos, "coffee", "closeup", seed=4))
    assert res.results[0].id == "mug"
    holder.close()


def test_a_projection_for_another_bundle_is_refused(tmp_path, adapted, encoder):
    path = tmp_path / "index"
    shutil.copytree(adapted[0], path, symlinks=True)
    with CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256) as idx:
        proj, items = idx.projection, list(idx.stored_items())
    other = Projection(proj.mean, proj.matrix, proj.fit_items, proj.views_per_item, "0" * 64)
    with pytest.raises(CatalogIndexError, match="fitted for bundle"):
        write_index(tmp_path / "other", items, bundle_sha256=encoder.sha256, n_trees=2, projection=other)
    save_projection(other, path / "current" / PROJECTION_FILE)  # a generation whose projection.npz came from elsewhere
    with pytest.raises(CatalogIndexError, match=f"{PROJECTION_FILE} was fitted for bundle sha256 000000000000"):
        CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256)


def test_fit_lw_whitens_the_view_differences():
    # Views move descriptors most along one direction (axis 0, 3x the others): Lw must discount it.
    rng = np.random.default_rng(0)
    orig = rng.normal(size=(50, 8))
    views = orig[:, None, :] + rng.normal(size=(50, 4, 8)) * np.array([3.0] + [0.3] * 7)
    mean, matrix = fit_lw(orig, views, dim=8, shrinkage=0.0)
    assert matrix.shape == (8, 8) and mean.shape == (8,)
    diff = (views - orig[:, None, :]).reshape(-1, 8) @ matrix.T
    assert np.allclose(diff.T @ diff / len(diff), np.eye(8), atol=1e-6)  # whitened (then only rotated)
    assert fit_lw(orig, views, dim=3, shrinkage=0.3)[1].shape == (3, 8)
