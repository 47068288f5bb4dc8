"""The catalog index on structured vectors: 300 random unit items in 64-d, queries = item + noise."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.core.config import IndexConfig
from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.index import ann_build as ann_build_mod
from edge_retrieval.index import writer as index_mod
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.item_table import IndexedItem
from edge_retrieval.index.reader import CatalogIndex, CatalogItem, angular_to_cosine
from edge_retrieval.index.writer import write_index

N, DIM, TREES = 300, 64, 50
# Annoy's default search effort (search_k=-1: n_trees * top_k nodes) is low for 64-d random data;
# the holder and the recall test search harder, as config.yaml should.
SEARCH_K = 2000
SHA = "a" * 64
REPO = Path(__file__).resolve().parents[2]


def cosine_to_angular(cosine: float | np.ndarray) -> float | np.ndarray:
    """Cosine similarity to Annoy's angular distance ``sqrt(2 - 2 cos)``."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(cosine, dtype=np.float64), 0.0))


def exact_query(vectors: np.ndarray, q: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine search, the ground truth for recall checks: (row indices, cosine scores), best
    first, of the ``top_k`` rows of ``vectors`` (N x D, L2-normalised) nearest to ``q``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(q, dtype=np.float32).reshape(-1)
    k = min(int(top_k), len(vectors))
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    scores = vectors @ (q / max(float(np.linalg.norm(q)), 1e-12))
    top = np.argsort(-scores, kind="stable")[:k]
    return top.astype(np.int64), scores[top]


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _thumb(item_id: str) -> bytes:
    # Distinct per id, so a thumbnail handed back for the wrong item is caught.
    return b"\xff\xd8" + item_id.encode() + b"\xff\xd9"


@pytest.fixture(scope="module")
def vecs() -> np.ndarray:
    return _unit(np.random.default_rng(0).standard_normal((N, DIM)))


def _items(vecs: np.ndarray, start: int = 0) -> list[CatalogItem]:
    out = []
    for i, v in enumerate(vecs, start):
        item_id = f"item-{i:04d}"
        out.append(CatalogItem(item_id, f"Label {i}", v, _thumb(item_id) if i % 7 else None, f"/photos/{i}.jpg"))
    return out


def _queries(vecs: np.ndarray, seed: int = 1, noise: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _unit(vecs + noise * rng.standard_normal(vecs.shape).astype(np.float32))


@pytest.fixture
def built(tmp_path, vecs) -> Path:
    root = tmp_path / "catalog"
    write_index(root, _items(vecs), bundle_sha256=SHA, n_trees=TREES)
    return root


def _load(root: Path, sha: str | None = SHA, search_k: int = -1) -> CatalogIndex:
    return CatalogIndex.load(root, expected_bundle_sha256=sha, search_k=search_k)


# ------------------------------------------------------------------------------- build, load, query

def test_build_load_query_matches_numpy(built, vecs):
    idx = _load(built)
    assert (idx.size, idx.dim, idx.bundle_sha256, idx.generation) == (N, DIM, SHA, "gen-000001")
    assert os.readlink(built / "current") == "gen-000001"
    assert idx.items[5] == IndexedItem("item-0005", "Label 5", "/photos/5.jpg")
    np.testing.assert_allclose(idx.vectors(), vecs, atol=1e-3)  # float16 on disk

    queries = _queries(vecs)
    hits = 0
    for i, q in enumerate(queries):
        got = idx.query(q, top_k=5)
        assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)
        hits += got[0].id == f"item-{i:04d}"
        rows, exact = exact_query(vecs, q, 5)
        if got[0].id == f"item-{rows[0]:04d}":
            assert got[0].score == pytest.approx(float(exact[0]), abs=1e-4)
        assert got[0].label == f"Label {int(got[0].id[5:])}"
    assert hits == N  # noise 0.05 in 64-d never moves a query to another item


def test_recall_against_exact_search(built, vecs):
    idx = _load(built, search_k=SEARCH_K)
    queries = _unit(np.random.default_rng(2).standard_normal((50, DIM)))  # hard: no planted match
    found = total = 0
    for q in queries:
        rows, scores = exact_query(vecs, q, 10)
        got = idx.query(q, top_k=10)
        truth = {f"item-{r:04d}" for r in rows}
        found += len(truth & {c.id for c in got})
        total += 10
        by_id = {c.id: c.score for c in got}
        for r, s in zip(rows, scores):  # every returned score is the true cosine
            if f"item-{r:04d}" in by_id:
                assert by_id[f"item-{r:04d}"] == pytest.approx(float(s), abs=1e-4)
    assert found / total >= 0.95


def test_cosine_angular_conversion():
    cos = np.array([-1.0, -0.3, 0.0, 0.5, 0.99, 1.0])
    np.testing.assert_allclose(angular_to_cosine(cosine_to_angular(cos)), cos, atol=1e-12)
    assert cosine_to_angular(1.0) == pytest.approx(0.0)
    assert cosine_to_angular(0.0) == pytest.approx(np.sqrt(2))
    assert cosine_to_angular(-1.0) == pytest.approx(2.0)
    # Annoy's own angular distance agrees with the formula.
    from annoy import AnnoyIndex

    a, b = _unit(np.random.default_rng(3).standard_normal((2, 16)))
    ann = AnnoyIndex(16, "angular")
    ann.add_item(0, a)
    ann.add_item(1, b)
    ann.build(1)
    assert angular_to_cosine(ann.get_distance(0, 1)) == pytest.approx(float(a @ b), abs=1e-5)


def test_exact_query_orders_best_first(vecs):
    rows, scores = exact_query(vecs, vecs[42] * 3.0, 4)  # scale of the query does not matter
    assert rows[0] == 42 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert list(scores) == sorted(scores, reverse=True)
    assert len(exact_query(vecs[:0], vecs[0], 3)[0]) == 0


def test_query_scale_invariant_and_validates(built, vecs):
    idx = _load(built)
    assert idx.query(vecs[3] * 10, 1)[0].id == "item-0003"
    with pytest.raises(CatalogIndexError, match="dim 63"):
        idx.query(vecs[3][:63], 1)
    with pytest.raises(CatalogIndexError, match="top_k"):
        idx.query(vecs[3], 0)


def test_thumbnails_and_has(built):
    idx = _load(built)
    assert idx.thumbnail("item-0001") == _thumb("item-0001")
    assert idx.thumbnail("item-0007") is None
    assert idx.has("item-0299") and not idx.has("nope")
    with pytest.raises(CatalogIndexError, match="'nope'"):
        idx.thumbnail("nope")


def test_empty_catalog(tmp_path, vecs):
    root = tmp_path / "empty"
    write_index(root, [], bundle_sha256=SHA, n_trees=TREES, dim=DIM)
    idx = _load(root)
    assert (idx.size, idx.dim, idx.items) == (0, DIM, [])
    assert idx.query(vecs[0], 5) == []
    assert idx.vectors().shape == (0, DIM)


# ------------------------------------------------------------------------------------- refusals

def test_bundle_sha_mismatch_refused(built):
    with pytest.raises(CatalogIndexError, match="bundle_sha256") as e:
        _load(built, sha="b" * 64)
    assert "aaaaaaaaaaaa" in str(e.value) and "bbbbbbbbbbbb" in str(e.value)
    assert "python -m edge_retrieval index build" in str(e.value)
    assert _load(built, sha=None).size == N  # no expectation: accepted


def test_missing_current_refused(tmp_path):
    with pytest.raises(CatalogIndexError, match="current") as e:
        _load(tmp_path / "nowhere")
    assert "python -m edge_retrieval index build --catalog" in str(e.value)


@pytest.mark.parametrize("name", ["vectors.ann", "vectors.npy", "meta.json", "thumbs.bin"])
def test_missing_file_refused(built, name):
    (built / "current" / name).unlink()
    with pytest.raises(CatalogIndexError, match=name.replace(".", r"\.")) as e:
        _load(built)
    assert "python -m edge_retrieval index build --catalog" in str(e.value)


def test_corrupt_ann_refused(built):
    ann = built / "current" / "vectors.ann"
    ann.write_bytes(b"garbage")
    with pytest.raises(CatalogIndexError, match=r"vectors\.ann"):
        _load(built)
    ann.write_bytes(b"")
    with pytest.raises(CatalogIndexError, match=r"vectors\.ann"):
        _load(built)


def _edit_meta(root: Path, **changes) -> None:
    meta_path = root / "current" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


def test_unknown_format_version_refused(built):
    _edit_meta(built, format_version=999)
    with pytest.raises(CatalogIndexError, match="format_version.*999"):
        _load(built)


def test_dim_mismatch_refused(built):
    _edit_meta(built, dim=32)
    with pytest.raises(CatalogIndexError, match="dim 32"):
        _load(built)


def test_corrupt_meta_refused(built):
    (built / "current" / "meta.json").write_text("{not json")
    with pytest.raises(CatalogIndexError, match=r"meta\.json"):
        _load(built)


def test_invalid_items_refused(tmp_path, vecs):
    root = tmp_path / "bad"
    items = _items(vecs[:3])
    dup = items + [CatalogItem("item-0001", "again", vecs[5])]
    with pytest.raises(CatalogIndexError, match="duplicate catalog id 'item-0001'"):
        write_index(root, dup, bundle_sha256=SHA, n_trees=TREES)
    with pytest.raises(CatalogIndexError, match="empty id"):
        write_index(root, [CatalogItem(" ", "x", vecs[0])], bundle_sha256=SHA, n_trees=TREES)
    with pytest.raises(CatalogIndexError, match="'short'.*dim 10"):
        write_index(root, items + [CatalogItem("short", "x", vecs[0][:10])], bundle_sha256=SHA, n_trees=TREES)
    bad = vecs[0].copy()
    bad[3] = np.nan
    with pytest.raises(CatalogIndexError, match="'nan'.*NaN"):
        write_index(root, items + [CatalogItem("nan", "x", bad)], bundle_sha256=SHA, n_trees=TREES)
    with pytest.raises(CatalogIndexError, match="dim 64, expected dim 128"):
        write_index(root, items, bundle_sha256=SHA, n_trees=TREES, dim=128)
    assert not (root / "current").exists()  # nothing was made live


# --------------------------------------------------------------------------- enrol / remove (holder)

def _holder(root: Path) -> IndexHolder:
    return IndexHolder(IndexConfig(path=root, search_k=SEARCH_K, n_trees=TREES), expected_bundle_sha256=SHA)


def test_add_new_item(built, vecs):
    holder = _holder(built)
    old = holder.current()
    new_vec = _unit(np.random.default_rng(9).standard_normal(DIM))
    holder.add([CatalogItem("new-1", "New one", new_vec, b"\xff\xd8new\xff\xd9", "/photos/new.jpg")])
    idx = holder.current()
    assert idx is not old and idx.generation == "gen-000002" != old.generation
    assert idx.size == N + 1
    assert holder.current().query(new_vec, 1)[0].id == "new-1"
    assert holder.current().query(new_vec, 1)[0].score == pytest.approx(1.0, abs=1e-5)
    assert idx.thumbnail("new-1") == b"\xff\xd8new\xff\xd9"
    for i, q in enumerate(_queries(vecs)[:50]):  # old items still there, thumbnails still theirs
        assert idx.query(q, 1)[0].id == f"item-{i:04d}"
        assert idx.thumbnail(f"item-{i:04d}") == (_thumb(f"item-{i:04d}") if i % 7 else None)
    # the replaced object still answers (a query that was in flight on it)
    assert old.query(vecs[0], 1)[0].id == "item-0000"
    # a fresh load sees the new generation too
    assert _load(built).size == N + 1


def test_readd_replaces(built, vecs):
    holder = _holder(built)
    moved = vecs[200]  # item-0010 now looks like item-0200's photo
    holder.add([CatalogItem("item-0010", "Relabelled", moved, b"\xff\xd8v2\xff\xd9", None)])
    idx = holder.current()
    assert idx.size == N
    assert idx.item("item-0010").label == "Relabelled" and idx.item("item-0010").source is None
    assert idx.thumbnail("item-0010") == b"\xff\xd8v2\xff\xd9"
    assert {c.id for c in idx.query(moved, 2)} == {"item-0010", "item-0200"}
    assert idx.query(vecs[10], 1)[0].id != "item-0010"  # the old vector is gone
    with pytest.raises(CatalogIndexError, match="duplicate catalog id 'x'"):
        holder.add([CatalogItem("x", "a", vecs[0]), CatalogItem("x", "b", vecs[1])])
    with pytest.raises(CatalogIndexError, match="dim 32, expected dim 64"):
        holder.add([CatalogItem("y", "a", vecs[0][:32])])
    assert holder.current() is idx  # failed enrolments change nothing


def test_remove(built, vecs):
    holder = _holder(built)
    removed = holder.remove(["item-0003", "not-there", "item-0100", "item-0003"])
    assert removed == ["item-0003", "item-0100"]
    idx = holder.current()
    assert idx.size == N - 2
    assert not idx.has("item-0003") and not idx.has("item-0100")
    assert all(c.id not in ("item-0003", "item-0100") for c in idx.query(vecs[3], 10))
    for it in idx.items:  # every remaining id still has its own thumbnail and vector
        i = int(it.id[5:])
        assert idx.thumbnail(it.id) == (_thumb(it.id) if i % 7 else None)
    rows = {it.id: r for r, it in enumerate(idx.items)}
    np.testing.assert_allclose(idx.vectors()[rows["item-0250"]], vecs[250], atol=1e-3)  # float16 on disk
    gen = idx.generation
    assert holder.remove(["nope"]) == [] and holder.current().generation == gen  # no rebuild for nothing


def test_old_generations_pruned_keep_previous(built, vecs):
    holder = _holder(built)
    first = holder.current()
    for k in range(3):
        holder.add([CatalogItem(f"n{k}", "n", vecs[k])])
    gens = sorted(p.name for p in built.glob("gen-*"))
    assert gens == ["gen-000003", "gen-000004"]
    assert os.readlink(built / "current") == "gen-000004"
    # an object still held on a deleted generation keeps working: its files are memory-mapped
    assert not first.path.exists()
    assert first.query(vecs[8], 1)[0].id == "item-0008" and first.thumbnail("item-0008") == _thumb("item-0008")


def test_add_to_empty_holder(tmp_path, vecs):
    holder = IndexHolder(IndexConfig(path=tmp_path / "fresh", n_trees=TREES), expected_bundle_sha256=SHA,
                         create_empty=True, dim=DIM)
    assert holder.current().query(vecs[0], 3) == []
    holder.add(_items(vecs[:20]))
    assert holder.current().size == 20 and holder.current().query(vecs[4], 1)[0].id == "item-0004"
    assert holder.remove(["item-0004"]) == ["item-0004"]


def test_refresh_picks_up_external_build(built, vecs):
    holder = _holder(built)
    write_index(built, _items(vecs[:10]), bundle_sha256=SHA, n_trees=TREES)  # e.g. the CLI
    assert holder.current().size == N
    assert holder.refresh() and holder.current().size == 10


def test_concurrent_queries_during_adds(built, vecs):
    holder = _holder(built)
    queries = _queries(vecs)
    errors: list[BaseException] = []
    seen_sizes: set[int] = set()
    done = 0
    stop, started = threading.Event(), threading.Event()

    def reader():
        nonlocal done
        try:
            i = 0
            while True:
                stopped = stop.is_set()  # read before the index: the last round sees the final one
                idx = holder.current()
                got = idx.query(queries[i % N], 3)
                assert got and got[0].id == f"item-{i % N:04d}", got
                seen_sizes.add(idx.size)
                done += 1
                i += 1
                if done == 20:
                    started.set()
                if stopped and done >= 200:
                    break
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)
            started.set()

    t = threading.Thread(target=reader)
    t.start()
    assert started.wait(timeout=30)
    for k in range(3):
        holder.add([CatalogItem(f"new-{k}", "n", _unit(np.random.default_rng(100 + k).standard_normal(DIM)))])
    stop.set()
    t.join(timeout=30)
    assert not t.is_alive() and not errors, errors
    assert done >= 200
    assert {N, N + 3} <= seen_sizes <= {N, N + 1, N + 2, N + 3}  # old and new were both served
    assert holder.current().size == N + 3


# ------------------------------------------------------------------------------------ crash safety

def _assert_old_intact(root: Path, vecs: np.ndarray) -> None:
    assert os.readlink(root / "current") == "gen-000001"
    idx = _load(root)
    assert idx.size == N
    for i, q in enumerate(_queries(vecs)[:30]):
        assert idx.query(q, 1)[0].id == f"item-{i:04d}"


def test_failed_swap_leaves_old_generation(built, vecs, monkeypatch):
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(index_mod.os, "replace", failing_replace)
    holder = _holder(built)
    with pytest.raises(CatalogIndexError, match="disk full"):
        holder.add([CatalogItem("new", "n", vecs[0])])
    monkeypatch.setattr(index_mod.os, "replace", real_replace)
    assert holder.current().generation == "gen-000001"
    _assert_old_intact(built, vecs)
    assert sorted(p.name for p in built.iterdir()) == [".lock", "current", "gen-000001"]


def test_failed_ann_build_leaves_old_generation(built, vecs, monkeypatch):
    class BrokenAnnoy(ann_build_mod.AnnoyIndex):
        def build(self, *args, **kwargs):
            raise OSError("I/O error (simulated)")

    monkeypatch.setattr(ann_build_mod, "AnnoyIndex", BrokenAnnoy)
    with pytest.raises(CatalogIndexError, match="I/O error"):
        write_index(built, _items(vecs[:5]), bundle_sha256=SHA, n_trees=TREES)
    monkeypatch.undo()
    _assert_old_intact(built, vecs)


def test_hard_crash_mid_build_then_next_build_cleans_up(built, vecs):
    # A real crash: the process dies inside write_index (after the npy and thumbs are written).
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        from edge_retrieval.index import ann_build as g
        from edge_retrieval.index import writer as m
        from edge_retrieval.index.reader import CatalogItem
        class Dying(g.AnnoyIndex):
            def build(self, *a, **k):
                os._exit(3)
        g.AnnoyIndex = Dying
        v = np.eye(4, dtype=np.float32)
        m.write_index({str(built)!r}, [CatalogItem(str(i), 'x', v[i]) for i in range(4)],
                      bundle_sha256='c' * 64, n_trees=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 3, proc.stderr.decode()
    leftovers = list(built.glob(".tmp-*"))
    assert leftovers and (leftovers[0] / "vectors.npy").exists()
    _assert_old_intact(built, vecs)

    gen = write_index(built, _items(vecs[:10]), bundle_sha256=SHA, n_trees=TREES)
    assert gen.name == "gen-000002" and not list(built.glob(".tmp-*"))
    assert _load(built).size == 10


def test_a_generation_streamed_in_survives_another_build_and_is_made_live_after_it(built, vecs):
    """A build streams its items into a .tmp-gen-* folder long before it commits (a 1M-item build: hours); another
    build meanwhile (a serve's enrolment, under the build lock) cleans up crashed builds' folders but not this one."""
    from edge_retrieval.index.writer import NewGeneration
    with NewGeneration(built, dim=DIM) as new:
        for item in _items(vecs[:100]):  # any iterable, one item at a time
            new.add(item)
        streaming = new.tmp
        # on disk already, but for what the file object buffers
        assert (streaming / "vectors.npy").stat().st_size >= 100 * DIM * 2 - io.DEFAULT_BUFFER_SIZE
        assert write_index(built, iter(_items(vecs[:5])), bundle_sha256=SHA, n_trees=TREES).name == "gen-000002"
        assert streaming.is_dir() and _load(built).size == 5
        assert new.commit(bundle_sha256=SHA, n_trees=TREES).name == "gen-000003"
    assert not streaming.exists() and not list(built.glob(".tmp-*"))
    idx = _load(built)
    assert idx.size == 100 and [i.id for i in idx.items] == [f"item-{i:04d}" for i in range(100)]
    assert np.array_equal(np.load(idx.path / "vectors.npy"), np.asarray(idx.vectors()))  # a plain .npy file
    assert not (idx.path / ".lock").exists()


def test_a_build_that_fails_midway_leaves_nothing_behind(built, vecs):
    from edge_retrieval.index.writer import NewGeneration
    with pytest.raises(CatalogIndexError, match="duplicate catalog id 'item-0001'"):
        with NewGeneration(built, dim=DIM) as new:
            for item in _items(vecs[:3]) + _items(vecs[1:2], start=1):
                new.add(item)
    assert not list(built.glob(".tmp-*"))
    _assert_old_intact(built, vecs)
