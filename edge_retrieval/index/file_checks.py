"""What ``open_generation`` (edge_retrieval/index/generation.py) checks of a generation's contents before the process
maps and trusts them: a same-size corrupt file passes every size check and then crashes or poisons the process —
an Annoy node whose child index is out of range is a SIGSEGV on the first query, a NaN vector spoils every rebuild.
A failed check is a ``CatalogIndexError``, so the generation is set aside like any other damage
(edge_retrieval/index/writer.py ``recover_index``). Each check reads its file once, in bounded chunks.

Annoy's file (annoylib.h, angular metric; ``AnnoyIndex.save``/``on_disk_build`` write its node array as is) is
``n_nodes`` nodes of ``3 + f`` little-endian 32-bit words: ``n_descendants`` (int32), ``children[2]`` (int32),
``v[f]`` (float32). Nodes ``0 … n_items-1`` are the items (``n_descendants`` 1, ``v`` the vector). Every later node
is made after its children: with ``n_descendants ≤ K = f + 2`` it is a leaf bucket whose ``children`` array runs on
over ``v`` and holds ``n_descendants`` item indices; otherwise it splits on the hyperplane ``v`` into the nodes
``children[0]`` and ``children[1]``. The roots are copied to the end of the file; Annoy reads ``n_items`` from the
last node. So a well-formed file has every child index below its own node (no cycles, nothing out of range).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_retrieval.core.errors import CatalogIndexError

_CHUNK_BYTES = 8 << 20  # read at a time (a 1M-item index is checked in a few hundred chunks, not one big copy)


def check_ann_file(path: Path, dim: int, n_items: int, hint: str) -> None:
    """Raise ``CatalogIndexError`` unless ``path`` is a well-formed Annoy angular index of ``n_items`` vectors of
    ``dim``: every node's child indices in range and below the node, item and split vectors finite."""
    words = 3 + max(dim, 1)
    size = path.stat().st_size

    def bad(why: str) -> CatalogIndexError:
        return CatalogIndexError(f"{path} is not a well-formed Annoy index of {n_items} vectors of dim {dim}: "
                                 f"{why}; {hint}")

    if size % (4 * words):
        raise bad(f"{size} bytes is not a whole number of {4 * words}-byte nodes")
    n_nodes = size // (4 * words)
    if n_items == 0:
        return  # never queried: an empty catalog answers [] before Annoy is asked
    if n_nodes <= n_items:
        raise bad(f"{n_nodes} nodes cannot hold {n_items} items and their trees")
    nodes = np.memmap(path, dtype="<i4", mode="r", shape=(n_nodes, words))
    if int(nodes[-1, 0]) != n_items:
        raise bad(f"the last root spans {int(nodes[-1, 0])} items")
    k = words - 1  # a bucket's children array: children[2] plus v[f]
    rows = max(1, _CHUNK_BYTES // (4 * words))
    for start in range(0, n_nodes, rows):
        block = np.asarray(nodes[start:start + rows])
        index = np.arange(start, start + len(block))
        desc = block[:, 0]
        item = index < n_items
        if (desc[item] != 1).any():
            raise bad("an item node does not hold exactly one item")
        inner = ~item
        if ((desc[inner] < 1) | (desc[inner] > n_items)).any():
            raise bad("a tree node spans fewer than 1 or more than all items")
        split = inner & (desc > k)
        children = block[split, 1:3]
        if ((children < 0) | (children >= index[split, None])).any():
            raise bad("a split node's child index is out of range or not below the node")
        bucket = inner & (desc <= k)
        members = block[bucket, 1:1 + k]
        used = np.arange(k)[None, :] < desc[bucket, None]
        if (((members < 0) | (members >= n_items)) & used).any():
            raise bad("a leaf bucket names an item out of range")
        if not np.isfinite(block[item | split, 3:].view("<f4")).all():
            raise bad("a vector or split plane holds NaN or infinity")


def check_finite(vectors: np.ndarray, path: Path, hint: str) -> None:
    """Raise ``CatalogIndexError`` when the (mapped) ``vectors`` hold NaN or infinity (checked in chunks)."""
    rows = max(1, _CHUNK_BYTES // max(1, vectors.itemsize * (vectors.shape[1] if vectors.ndim > 1 else 1)))
    for start in range(0, len(vectors), rows):
        if not np.isfinite(np.asarray(vectors[start:start + rows])).all():
            raise CatalogIndexError(f"{path} holds NaN or infinite values (from row {start}); {hint}")
