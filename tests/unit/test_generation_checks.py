"""Every file of a generation is checked before the process maps and trusts it: a same-size corrupt vectors.ann
(a child index out of range: a SIGSEGV on the first query), bad UTF-8 in items.bin, a NaN in vectors.npy — each
generation is set aside (renamed, never deleted) and the newest intact one serves. A ``current`` link that points
outside the index folder is itself set aside; nothing outside the folder is ever renamed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.index.file_checks import check_ann_file
from edge_retrieval.index.reader import CatalogIndex, CatalogItem
from edge_retrieval.index.writer import recover_index, write_index

DIM, SHA = 8, "s" * 64
QUERY = """
import sys
import numpy as np
from edge_retrieval.index.reader import CatalogIndex
index = CatalogIndex.load(sys.argv[1], expected_bundle_sha256=None)
print(index.generation, len(index.query(np.ones({dim}, np.float32), 5)))
"""


def _items(n: int, seed: int = 0) -> list[CatalogItem]:
    rng = np.random.default_rng(seed)
    return [CatalogItem(f"i{k}", f"label-{k}", rng.normal(size=(2, DIM)).astype(np.float32), b"\xff\xd8thumb")
            for k in range(n)]


@pytest.fixture()
def index(tmp_path) -> tuple[Path, Path, Path]:
    """(index folder, older generation, newer generation): 40 items of 2 vectors each, so Annoy has split nodes."""
    root = tmp_path / "index"
    older = write_index(root, _items(30), bundle_sha256=SHA, n_trees=2)
    newer = write_index(root, _items(40, seed=1), bundle_sha256=SHA, n_trees=2)
    return root, older, newer


def _nodes(gen: Path) -> np.memmap:
    return np.memmap(gen / "vectors.ann", dtype="<i4", mode="r+").reshape(-1, 3 + DIM)


def _query_in_a_child(root: Path) -> subprocess.CompletedProcess:
    """Load ``current`` and query it in another process: a crash there is a signal, not this test run dying."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-c", QUERY.format(dim=DIM), str(root)], capture_output=True, text=True,
                          env=env, timeout=120)


def _corrupt_split_child(gen: Path) -> None:
    nodes = _nodes(gen)
    items, k = 80, DIM + 2
    split = next(i for i in range(items, len(nodes)) if nodes[i, 0] > k)
    nodes[split, 1] = 10**8  # same size, a child far beyond the file
    nodes.flush()


def _corrupt_bucket_member(gen: Path) -> None:
    nodes = _nodes(gen)
    bucket = next(i for i in range(80, len(nodes)) if 1 < nodes[i, 0] <= DIM + 2)
    nodes[bucket, 2] = -5
    nodes.flush()


def _nan_in_annoy(gen: Path) -> None:
    nodes = _nodes(gen)
    nodes[3, 5] = np.array([np.nan], "<f4").view("<i4")[0]
    nodes.flush()


def _bad_utf8_label(gen: Path) -> None:
    data = bytearray((gen / "items.bin").read_bytes())
    at = data.index(b"label-7")
    data[at:at + 2] = b"\xff\xfe"
    (gen / "items.bin").write_bytes(bytes(data))


def _nan_vector(gen: Path) -> None:
    vectors = np.load(gen / "vectors.npy", mmap_mode="r+")
    vectors[5, 3] = np.nan
    vectors.flush()


@pytest.mark.parametrize("damage", [_corrupt_split_child, _corrupt_bucket_member, _nan_in_annoy, _bad_utf8_label,
                                    _nan_vector])
def test_a_same_size_corrupt_file_sets_its_generation_aside_and_the_older_one_serves(index, damage):
    root, older, newer = index
    size = {p.name: p.stat().st_size for p in newer.iterdir()}
    damage(newer)
    assert {p.name: p.stat().st_size for p in newer.iterdir()} == size  # every size check still passes
    with pytest.raises(CatalogIndexError, match="rebuild"):
        CatalogIndex.load_generation(newer, expected_bundle_sha256=None)
    aside = recover_index(root)
    assert [a["name"] for a in aside] == [newer.name]
    assert (root / aside[0]["set_aside_as"]).is_dir() and os.readlink(root / "current") == older.name
    done = _query_in_a_child(root)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == [older.name, "5"]


def test_the_unchecked_corrupt_annoy_file_is_what_kills_a_process(index):
    """Why the check exists: the same file handed to Annoy directly is a crash on the first query."""
    root, _, newer = index
    _corrupt_split_child(newer)
    code = (f"import sys; from annoy import AnnoyIndex; a = AnnoyIndex({DIM}, 'angular'); a.load(sys.argv[1]); "
            f"[a.get_nns_by_vector([1.0] * {DIM}, 50, -1) for _ in range(3)]")
    done = subprocess.run([sys.executable, "-c", code, str(newer / "vectors.ann")], capture_output=True, timeout=120)
    assert done.returncode != 0  # SIGSEGV (-11) here; the checked load refuses it instead
    with pytest.raises(CatalogIndexError, match="child index"):
        check_ann_file(newer / "vectors.ann", DIM, 80, "rebuild")


@pytest.mark.parametrize("target", ["../history", "ABS", "..", "../index"])
def test_a_current_link_outside_the_index_folder_is_set_aside_and_nothing_outside_is_renamed(index, target):
    root, _, newer = index
    history = root.parent / "history"
    history.mkdir()
    (history / "history.sqlite").write_bytes(b"precious")
    (root / "current").unlink()
    os.symlink(str(history) if target == "ABS" else target, root / "current")
    with pytest.raises(CatalogIndexError):
        CatalogIndex.load(root, expected_bundle_sha256=None)
    before = sorted(p.name for p in root.parent.iterdir())
    aside = recover_index(root)
    assert sorted(p.name for p in root.parent.iterdir()) == before  # nothing beside the index folder moved
    assert (history / "history.sqlite").read_bytes() == b"precious"
    assert [a["name"] for a in aside] == ["current"] and os.readlink(root / "current") == newer.name
    assert (root / aside[0]["set_aside_as"]).is_symlink()  # the link itself, renamed inside the folder


def test_an_item_table_of_the_previous_version_is_read_and_photos_group_by_item(tmp_path):
    """items.bin version 1 (no attributes; every key an item) still opens; version 2 groups photos by item."""
    import struct

    from edge_retrieval.index.item_table import ItemTable, id_hash
    ids, labels = ["mug", "cup"], ["Mug", "Cup"]
    texts = [s.encode() for s in ids + labels] + [b"", b""]
    off = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype("<i8")
    hashes = np.array([id_hash(i) for i in ids], "<u8")
    order = np.argsort(hashes).astype("<i8")
    v1 = (struct.pack("<4sIII", b"ITEM", 1, 2, 0) + off[0:3].tobytes() + off[2:5].tobytes() + off[4:7].tobytes()
          + np.full((2, 2), [-1, 0], "<i8").tobytes() + hashes[order].tobytes() + order.tobytes() + b"".join(texts))
    (tmp_path / "v1.bin").write_bytes(v1)
    old = ItemTable.open(tmp_path / "v1.bin", thumbs_size=0)
    assert [old.item(r).id for r in range(2)] == ids and old.attributes(0) == {} and old.item_count == 2
    assert old.row("cup") == 1 and old.photo_rows("mug") == [0]
    keys = ["mug", "cup", "mug#side", "mugs", "mug#top"]
    ItemTable.build(keys, ["Mug"] * 5, [None] * 5, [None] * 5,
                    [{"sku": "M-1"}, {}, {"sku": "M-1"}, {}, {}]).write(tmp_path / "v2.bin")
    new = ItemTable.open(tmp_path / "v2.bin", thumbs_size=0)
    assert new.photo_rows("mug") == [0, 2, 4] and new.photo_rows("mugs") == [3] and new.photo_rows("mu") == []
    assert new.item_count == 3 and new.attributes(2) == {"sku": "M-1"} and new.item(1).attributes == {}
