"""Building a generation's ``vectors.ann`` (its format: edge_retrieval/index/file_checks.py) so that a full disk is an
error, never a crash. Annoy's ``on_disk_build`` grows a sparse file and writes its nodes through a shared mapping:
on a full file system the kernel has no block for a page and kills the whole process with SIGBUS (seen in 4 of 6
rounds of a disk filling during a rebuild). So:

- an index that fits ``IN_MEMORY_MAX_BYTES`` (most catalogs: 100k items at 256-d, 20k at 1280-d) is built in
  anonymous memory and saved with ``write()`` — ENOSPC is then an ordinary error (DiskFullError);
- a larger one is built on disk only after the free space for its estimated size was found, and in a child
  process: if the disk still fills (another writer), the child dies, not the server, and the caller gets an error.
Either way the caller removes the half-written generation folder.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from edge_retrieval.core.errors import CatalogIndexError, DiskFullError
from edge_retrieval.model.adaptation import Projection

METRIC = "angular"
IN_MEMORY_MAX_BYTES = 128 << 20
_CHUNK = 65536  # vectors projected at a time (a 1M-item catalog's float32 copy would be GBs)


def estimate_ann_bytes(n_vectors: int, dim: int, n_trees: int) -> int:
    """An upper estimate of the Annoy file of ``n_vectors`` of ``dim`` with ``n_trees``: the item nodes plus, per
    tree, about 16 nodes per bucket of ``dim + 2`` items (measured: 4–13 on random and clustered vectors)."""
    words = 3 + max(dim, 1)
    per_tree = 16 * n_vectors // (words - 1) + 16
    return 4 * words * (n_vectors + n_trees * (per_tree + 1))


def build_ann(path: Path, vectors_path: Path, projection: Projection | None, dim: int, n_trees: int) -> None:
    """Write ``path``: the vectors of ``vectors_path`` (an .npy, projected by ``projection``), ``n_trees`` trees,
    fsynced. DiskFullError when the disk cannot hold it (nothing crashes), CatalogIndexError for other failures."""
    n = len(np.load(vectors_path, mmap_mode="r", allow_pickle=False))
    need = estimate_ann_bytes(n, dim, n_trees)
    if need <= IN_MEMORY_MAX_BYTES:
        _build(str(path), str(vectors_path), projection, dim, n_trees, False)
        return
    st = os.statvfs(path.parent)
    if st.f_bavail * st.f_frsize < need:
        raise DiskFullError(f"only {st.f_bavail * st.f_frsize / 1e6:.1f} MB free on the disk of {path.parent}; "
                            f"the index's trees need about {need / 1e6:.1f} MB: free some space")
    child = multiprocessing.get_context("spawn").Process(
        target=_build, args=(str(path), str(vectors_path), projection, dim, n_trees, True), name="annoy-build")
    child.start()
    child.join()
    if child.exitcode != 0:
        signal = f"signal {-child.exitcode}" if child.exitcode < 0 else f"exit status {child.exitcode}"
        raise CatalogIndexError(f"building {path} failed in its builder process ({signal}"
                                f"{': the disk filled up' if child.exitcode == -7 else ''}); nothing was made live")


def _build(path: str, vectors_path: str, projection: Projection | None, dim: int, n_trees: int,
           on_disk: bool) -> None:
    ann = AnnoyIndex(max(dim, 1), METRIC)
    ann.set_seed(0)  # same catalog, same trees: builds are reproducible
    if on_disk:  # its pages are page cache the kernel can write back and drop, not anonymous memory
        ann.on_disk_build(path)
    vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
    for start in range(0, len(vectors), _CHUNK):
        chunk = np.asarray(vectors[start:start + _CHUNK], np.float32)
        for i, v in enumerate(projection.apply(chunk) if projection is not None else chunk, start):
            ann.add_item(i, v)
    del vectors
    ann.build(int(n_trees))
    if not on_disk:
        try:
            ann.save(path)  # fwrite: a full disk is an error here, not a SIGBUS
        except OSError as e:  # Annoy's message carries the errno in brackets, its exception none
            if "(28)" in str(e) or "(122)" in str(e):
                raise DiskFullError(f"the disk of {path} is full: the index's trees could not be written") from None
            raise CatalogIndexError(f"could not write {path}: {e}") from None
    ann.unload()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
