"""Builds that outgrow one process: the same generation from worker processes and from Ray actors (a two-node
cluster simulated on this machine) as from an in-process build; a worker process, a Ray worker or the driver
killed mid-build leaves the live generation intact."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.catalog.build_workers import ProcessRunner
from edge_retrieval.core.config import OPEN_BUNDLE, RecognitionConfig
from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.index.reader import CatalogIndex, read_current_name
from edge_retrieval.search.lookup import Lookup
from tests.conftest import ROOT, view

# Everything a build makes, small: enrolment views, ORB features, thumbnails, adaptation views.
RC = RecognitionConfig(enrol_views=[0.7], n_features=200, adapt_views=2, adapt_max_items=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, catalog_dir):
    """The test catalog plus an unreadable image."""
    d = tmp_path_factory.mktemp("scale") / "catalog"
    shutil.copytree(catalog_dir, d)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return d


@pytest.fixture(scope="module")
def local(tmp_path_factory, folder, encoder):
    """The reference: an in-process build."""
    path = tmp_path_factory.mktemp("local") / "index"
    rep = build_index(folder, ItemMaker(encoder, RC, 160), path, n_trees=4, progress=False)
    return path, rep


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes of one CPU each on this machine, shared by the Ray tests (start-up costs seconds)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[scale]' (make test does)")
    from ray.cluster_utils import Cluster

    from edge_retrieval.catalog.ray_build import job_runtime_env
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, runtime_env=job_runtime_env())
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def assert_same_generation(a_path, b_path):
    """Ids, labels, sources, vectors, owners, features, thumbnails and projection agree."""
    with CatalogIndex.load(a_path, expected_bundle_sha256=None) as a, \
            CatalogIndex.load(b_path, expected_bundle_sha256=None) as b:
        assert a.items == b.items
        np.testing.assert_allclose(np.asarray(a.vectors(), np.float32), np.asarray(b.vectors(), np.float32),
                                   atol=2e-3)
        assert np.array_equal(np.load(a.path / "owners.npy"), np.load(b.path / "owners.npy"))
        for it in a.items:
            fa, fb = a.features(it.id), b.features(it.id)
            assert (fa is None) == (fb is None)
            if fa is not None:
                assert np.array_equal(fa.desc, fb.desc) and np.array_equal(fa.xy, fb.xy) and fa.size_wh == fb.size_wh
            assert a.thumbnail(it.id) == b.thumbnail(it.id)
        assert (a.projection is None) == (b.projection is None)
        if a.projection is not None:
            np.testing.assert_allclose(a.projection.matrix, b.projection.matrix, atol=1e-2)
            np.testing.assert_allclose(a.projection.mean, b.projection.mean, atol=1e-3)


def test_worker_processes_build_the_same_generation(tmp_path, folder, local, encoder):
    maker = ItemMaker(encoder, RC, 160)
    rep = build_index(folder, maker, tmp_path / "index", n_trees=4, progress=False,
                      runner=ProcessRunner(maker.spec(1), 2, min_tasks=0))
    assert rep.workers == "2 worker processes × 1 thread"
    assert rep.skipped == local[1].skipped and [r for r, _ in rep.skipped] == ["broken.jpg"]
    assert rep.adapt_items == local[1].adapt_items > 2
    assert_same_generation(local[0], tmp_path / "index")


def test_ray_on_a_two_node_cluster_builds_the_same_generation_and_the_device_serves_it(
        tmp_path, folder, local, encoder, photos, ray_cluster):
    from edge_retrieval.catalog.ray_build import RayRunner
    maker = ItemMaker(encoder, RC, 160)
    runner = RayRunner(maker.spec(1), address=ray_cluster.address, batch_size=2)
    rep = build_index(folder, maker, tmp_path / "index", n_trees=4, progress=False, runner=runner)
    assert rep.workers.startswith("Ray") and "2 actors" in rep.workers
    assert rep.skipped == local[1].skipped
    assert rep.indexed == local[1].indexed
    assert_same_generation(local[0], tmp_path / "index")
    # the device (no Ray in it) serves the Ray-built generation as it serves a local one
    with CatalogIndex.load(tmp_path / "index", expected_bundle_sha256=encoder.sha256) as idx, \
            CatalogIndex.load(local[0], expected_bundle_sha256=encoder.sha256) as ref:
        q = view(photos, "chelsea", "perspective", seed=5)
        got = Lookup(encoder, idx, RC, top_k=3).lookup_rgb(q)
        want = Lookup(encoder, ref, RC, top_k=3).lookup_rgb(q)
        assert [c.id for c in got.results] == [c.id for c in want.results]
        assert got.match is not None and got.match.id == "chelsea"


def _live(path) -> tuple[str, list[str]]:
    with CatalogIndex.load(path, expected_bundle_sha256=None) as idx:
        return idx.generation, [i.id for i in idx.items]


def test_a_killed_build_worker_leaves_the_live_generation_intact(tmp_path, folder, local, encoder):
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "index"
    shutil.copytree(local[0], path, symlinks=True)
    before = _live(path)
    maker = ItemMaker(encoder, RC, 160)
    errors: list[BaseException] = []

    def build():
        try:
            build_index(folder, maker, path, n_trees=4, progress=False,
                        runner=ProcessRunner(maker.spec(1), 2, min_tasks=0))
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    me = psutil.Process()
    earlier = {c.pid for c in me.children()}  # another test's pool may still be winding down: not this build's

    def workers():
        out = []
        for c in me.children():
            try:
                if c.pid not in earlier and "spawn_main" in " ".join(c.cmdline()):
                    out.append(c)
            except psutil.Error:  # gone between listing and asking
                pass
        return out

    t = threading.Thread(target=build)
    t.start()
    deadline = time.monotonic() + 60
    while not (kids := workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kids, "no worker process started"
    kids[0].kill()
    t.join(120)
    assert errors and isinstance(errors[0], CatalogIndexError) and "died" in str(errors[0])
    assert _live(path) == before
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("gen-")) == [before[0]]


def test_a_killed_ray_driver_leaves_the_live_generation_intact(tmp_path, folder, local, ray_cluster):
    path = tmp_path / "index"
    shutil.copytree(local[0], path, symlinks=True)
    before = _live(path)
    config = tmp_path / "config.yaml"
    config.write_text("recognition:\n  enrol_views: [0.7]\n  n_features: 200\n  adapt_views: 2\n"
                      "  adapt_max_items: 8\nindex:\n  n_trees: 4\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge_retrieval", "index", "build", "--config", str(config),
                             "--catalog", str(folder), "--out", str(path), "--bundle", str(OPEN_BUNDLE),
                             "--ray", ray_cluster.address], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen = []
    for line in proc.stderr:  # killed once the actors have their work
        seen.append(line)
        if "ray build:" in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert _live(path) == before
    assert read_current_name(path) == before[0]
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("gen-")) == [before[0]]


def test_the_item_table_round_trips_non_ascii_ids_and_labels_and_enrolment_after_it_works(tmp_path, encoder, photos):
    from edge_retrieval.core.config import IndexConfig
    from edge_retrieval.index.holder import IndexHolder
    from edge_retrieval.index.item_table import IndexedItem, ItemTable
    from edge_retrieval.index.writer import write_index
    maker = ItemMaker(encoder, RecognitionConfig(enrol_views=[], features=False, verify=False), 160)
    names = {"Kärtchen/Straße 1": "Grüße aus Köln", "日本/東京": "東京タワー 🗼", "cats/chelsea": "Chelsea",
             "éé": "é" * 200}
    items = [maker.make(photos[p], i, label) for (i, label), p in zip(names.items(), ("rocket", "moon", "chelsea", "coins"))]
    items[2] = ItemMaker(encoder, maker.recognition, 160).make(photos["chelsea"], "cats/chelsea", "Chelsea",
                                                               source="/fotos/Chélsea.jpg")
    root = tmp_path / "index"
    write_index(root, items, bundle_sha256=encoder.sha256, n_trees=2, dim=encoder.dim)
    gen = root / read_current_name(root)
    assert "Kärtchen" not in (gen / "meta.json").read_text(encoding="utf-8")  # the table, not the meta, holds them
    table = ItemTable.open(gen / "items.bin", thumbs_size=(gen / "thumbs.bin").stat().st_size)
    assert [table.item(r) for r in range(len(table))] == [
        IndexedItem(i, lab, "/fotos/Chélsea.jpg" if i == "cats/chelsea" else None) for i, lab in names.items()]
    assert table.row("日本/東京") == 1 and table.row("日本") is None and table.row("") is None
    holder = IndexHolder(IndexConfig(path=root, n_trees=2), expected_bundle_sha256=encoder.sha256)
    idx = holder.current()
    assert [i.id for i in idx.items] == list(names) and idx.item("éé").label == "é" * 200
    assert idx.thumbnail("日本/東京") == items[1].thumbnail_jpeg
    # an enrolment after it: a new non-ASCII item, one replaced, the rest carried over from the table
    holder.add([maker.make(photos["astronaut"], "Raumfahrt/Ästronaut", "Astronautin"),
                maker.make(photos["clock"], "日本/東京", "時計")])
    idx = holder.current()
    assert idx.size == 5 and idx.item("日本/東京").label == "時計" and idx.item("Kärtchen/Straße 1").label == "Grüße aus Köln"
    assert idx.item("cats/chelsea").source == "/fotos/Chélsea.jpg"
    assert idx.query(encoder.embed(photos["astronaut"]), top_k=1)[0].id == "Raumfahrt/Ästronaut"
    assert idx.query(encoder.embed(photos["rocket"]), top_k=1)[0].id == "Kärtchen/Straße 1"
    holder.close()


def test_a_format_1_generation_still_loads(tmp_path, encoder, photos):
    """An index written before the item table (items listed in meta.json, float32 vectors) is served as it was."""
    import json

    from edge_retrieval.index.writer import write_index
    maker = ItemMaker(encoder, RecognitionConfig(enrol_views=[], features=False, verify=False), 160)
    root = tmp_path / "index"
    write_index(root, [maker.make(photos["rocket"], "röcket", "Rakete"), maker.make(photos["moon"], "moon", "Mond")],
                bundle_sha256=encoder.sha256, n_trees=2, dim=encoder.dim)
    gen = root / read_current_name(root)
    with CatalogIndex.load(root, expected_bundle_sha256=None) as idx:
        spans = [idx._table.thumb_span(r) for r in range(2)]
    meta = json.loads((gen / "meta.json").read_text())
    meta.update(format_version=1, items=[{"id": "röcket", "label": "Rakete", "source": None},
                                         {"id": "moon", "label": "Mond", "source": None}], thumbs=spans)
    del meta["count"]
    (gen / "meta.json").write_text(json.dumps(meta))
    (gen / "items.bin").unlink()
    np.save(gen / "vectors.npy", np.load(gen / "vectors.npy").astype(np.float32))
    with CatalogIndex.load(root, expected_bundle_sha256=encoder.sha256) as idx:
        assert [i.label for i in idx.items] == ["Rakete", "Mond"]
        assert idx.query(encoder.embed(photos["rocket"]), top_k=1)[0].id == "röcket"
        assert idx.thumbnail("moon")


def _ray_actor_processes(psutil) -> list:
    """This test's Ray Data actor processes (Ray titles them ``ray::MapWorker(MapBatches(ItemActor))…``): only
    descendants of this process, so no other Ray on the machine is touched."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "MapWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:  # exited meanwhile
            pass
    return out


class _KillAnActorAfterTheFirstResult:
    """A RayRunner whose first result, once it reached the driver, is followed by SIGKILL to one of the actors'
    worker processes (work of the build is still queued on them): the kill lands mid-build, every time."""

    def __init__(self, runner, psutil):
        self.runner, self.psutil, self.killed, self.serving = runner, psutil, [], set()

    def map(self, tasks):
        for result in self.runner.map(tasks):
            if not self.killed:
                actors = _ray_actor_processes(self.psutil)
                assert actors, "no Ray actor process found among this test's descendants"
                actors[0].send_signal(signal.SIGKILL)
                actors[0].wait(10)
                self.killed.append(actors[0].pid)
            elif not self.serving:  # who works on after the kill (the actor held batches in flight: lost with it)
                self.serving = {a.pid for a in _ray_actor_processes(self.psutil)}
            yield result

    def describe(self):
        return self.runner.describe()

    def close(self):
        self.runner.close()


def _files(gen) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(gen.iterdir())}


def test_a_killed_ray_worker_leaves_the_live_generation_intact_and_ray_retries_its_batch(
        tmp_path, folder, local, encoder, ray_cluster):
    """SIGKILL to a Ray actor's worker process mid-build: Ray restarts the actor and retries its batch (Ray Data's
    actor pool: max_restarts / max_task_retries -1), so the build completes with the generation a local build
    makes; the previous generation is untouched throughout and stays on disk beside the new one."""
    psutil = pytest.importorskip("psutil", reason="psutil finds the Ray worker process to kill")
    from edge_retrieval.catalog.ray_build import RayRunner
    path = tmp_path / "index"
    shutil.copytree(local[0], path, symlinks=True)
    before, before_files = _live(path), _files(path / read_current_name(path))
    maker = ItemMaker(encoder, RC, 160)
    runner = _KillAnActorAfterTheFirstResult(RayRunner(maker.spec(1), address=ray_cluster.address, batch_size=1),
                                             psutil)
    rep = build_index(folder, maker, path, n_trees=4, progress=False, runner=runner)
    assert len(runner.killed) == 1 and not psutil.pid_exists(runner.killed[0])
    assert runner.serving and runner.killed[0] not in runner.serving  # Ray restarted / replaced the actor
    assert rep.indexed == local[1].indexed and rep.skipped == local[1].skipped
    assert rep.generation != before[0] and read_current_name(path) == rep.generation
    assert_same_generation(local[0], path)
    assert _files(path / before[0]) == before_files  # the previous generation: kept, byte for byte
    assert _live(path)[1] == before[1]
