"""Searching the catalog index: one generation loaded (memory-mapped), queried, its items, features and thumbnails.
The files of a generation (write, open, check) are edge_retrieval/index/generation.py; making one live (build lock, rename,
swap) edge_retrieval/index/writer.py; the live index of a running appliance (enrol / remove) edge_retrieval/index/holder.py.

On disk the index is a directory::

    var/catalog/
      .lock                  flock'd while a generation is made live (CLI and server may both build)
      current -> gen-000007  the live generation; replaced with os.replace, so readers see old or new
      gen-000006/            the previous generation, kept (a reader that resolved it earlier still works)
      gen-000007/            vectors.ann, vectors.npy, owners.npy, features.bin, thumbs.bin, items.bin,
                             projection.npz, meta.json (edge_retrieval/index/generation.py)
      .tmp-gen-XXXX/         a generation being written (its .lock flock'd by the writer)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.core.results import Candidate
from edge_retrieval.index.generation import BUILD_HINT, REBUILD_HINT, Generation, open_generation
from edge_retrieval.index.item_table import IndexedItem
from edge_retrieval.model.local_features import Features

CURRENT = "current"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CatalogItem:
    """One item to write into the index: its descriptor(s) plus what the UI shows for it.

    ``vector`` is one descriptor (D,) or several (V, D): the image itself plus simulated camera views
    (multi-view enrolment); an item's score is the max over its vectors. ``features`` are its local
    features for spatial verification (None: not verifiable)."""

    id: str
    label: str
    vector: np.ndarray
    thumbnail_jpeg: bytes | None = None
    source: str | None = None  # the original image path, if any
    features: Features | None = None
    attributes: dict[str, str] = field(default_factory=dict)  # the item's (every photo carries them)


def angular_to_cosine(distance: float | np.ndarray) -> float | np.ndarray:
    """Annoy's angular distance ``sqrt(2 - 2 cos)`` back to cosine similarity, clipped to [-1, 1]."""
    return np.clip(1.0 - np.square(distance) / 2.0, -1.0, 1.0)


def index_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an index with a live generation (without loading it)."""
    return read_current_name(Path(path)) is not None


def read_current_name(root: Path) -> str | None:
    """The generation directory name ``current`` points to, or None when there is none — also when the link names
    anything but a folder beside it (``../history``, an absolute path, ``..``): nothing outside the index folder is
    ever loaded, renamed or removed through ``current``."""
    try:
        name = os.readlink(root / CURRENT)
    except OSError:
        return None
    return name if name and "/" not in name and "\0" not in name and not name.startswith(".") else None


class CatalogIndex:
    """One loaded (read-only) generation of the catalog index. Queries are thread-safe."""

    def __init__(self, gen: Generation, *, search_k: int = -1):
        """Use :meth:`load`; this constructor takes an opened, checked generation (edge_retrieval/index/generation.py)."""
        self._gen_dir = gen.path
        self.projection = gen.projection  # catalog-adapted Lw: Annoy holds projected vectors, vectors.npy the raw
        self._owners = gen.owners if gen.owners is not None else np.arange(len(gen.vectors), dtype=np.int32)
        self._views_max = int(np.bincount(self._owners).max()) if len(self._owners) else 1
        self._features, self.features_error = gen.features, gen.features_error
        self._by_item: tuple[np.ndarray, np.ndarray] | None = None
        self._ann = gen.ann
        self._vectors = gen.vectors
        self._thumbs_map = gen.thumbs
        self._table = gen.table  # mapped: no Python object per item (a format-1 meta's lists are dropped here)
        self._meta = gen.meta.model_copy(update={"items": [], "thumbs": []})
        self._search_k = int(search_k)

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_bundle_sha256: str | None,
             search_k: int = -1, require_features: bool = False) -> CatalogIndex:
        """Load the live generation of the index directory ``path`` (the one ``current`` names).

        Files are memory-mapped, not read. With ``expected_bundle_sha256`` the index must have been built with
        that bundle. ``search_k``: Annoy's search effort (-1: n_trees * top_k). A missing or corrupt features.bin
        is an error with ``require_features``; else the index loads without verification (``features_error``).
        Raises CatalogIndexError naming the missing/bad file or field."""
        root = Path(path)
        current, target = root / CURRENT, read_current_name(root)
        if target is None:
            raise CatalogIndexError(f"no catalog index at {root}: {current} does not exist or is not a "
                                    f"generation symlink; {BUILD_HINT}")
        # Resolve once: every file below comes from this generation even if `current` moves meanwhile.
        gen_dir = root / target
        if not gen_dir.is_dir():
            raise CatalogIndexError(f"{current} points to {gen_dir}, which does not exist; {BUILD_HINT}")
        return cls.load_generation(gen_dir, expected_bundle_sha256=expected_bundle_sha256, search_k=search_k,
                                   require_features=require_features)

    @classmethod
    def load_generation(cls, gen_dir: str | os.PathLike, *, expected_bundle_sha256: str | None,
                        search_k: int = -1, require_features: bool = False) -> CatalogIndex:
        """Load one generation directory (``gen-N``) directly; see :meth:`load`."""
        return cls(open_generation(gen_dir, expected_bundle_sha256=expected_bundle_sha256,
                                   require_features=require_features), search_k=search_k)

    # -- properties
    @property
    def dim(self) -> int:
        """Descriptor dimension (0 only for an empty catalog built without one)."""
        return self._meta.dim

    @property
    def size(self) -> int:
        """Number of entries (photos; ``item_count`` counts items)."""
        return len(self._table)

    @property
    def bundle_sha256(self) -> str:
        """sha256 of the encoder bundle the vectors were made with."""
        return self._meta.bundle_sha256

    @property
    def generation(self) -> str:
        """Name of the loaded generation directory, e.g. ``gen-000007``."""
        return self._gen_dir.name

    @property
    def path(self) -> Path:
        """The loaded generation directory."""
        return self._gen_dir

    @property
    def n_trees(self) -> int:
        """Number of Annoy trees this generation was built with."""
        return self._meta.n_trees

    @property
    def store_seq(self) -> tuple[str, int] | None:
        """(id of the catalog store, highest change seq) this generation holds (edge_retrieval/catalog/store.py); None: no store."""
        return self._meta.store

    @property
    def items(self) -> list[IndexedItem]:
        """id / label / source of every item, in vector order (made on demand: one object per item)."""
        return [self._table.item(row) for row in range(len(self._table))]

    # -- lookups
    def has(self, item_id: str) -> bool:
        """Whether the entry key ``item_id`` (an item's first photo, or ``<id>#<photo>``) is in this generation."""
        return self._table.row(item_id) is not None

    def photos(self, item_id: str) -> list[str]:
        """The entry keys of every photo of item ``item_id`` here ([] when the item is not in this generation)."""
        return [self._table.id(r) for r in self._table.photo_rows(item_id)]

    @property
    def item_count(self) -> int:
        """How many items (not photos) this generation holds."""
        return self._table.item_count

    def item(self, item_id: str) -> IndexedItem:
        """id / label / source of ``item_id``; CatalogIndexError when it is not in the index."""
        return self._table.item(self._row(item_id))

    def thumbnail(self, item_id: str) -> bytes | None:
        """The JPEG thumbnail of ``item_id`` (None when it was enrolled without one).
        Raises CatalogIndexError when the id is not in the index."""
        return self._thumbnail_at(self._row(item_id))

    def vectors(self) -> np.ndarray:
        """The N x D L2-normalised descriptors as the bundle made them (read-only memory map of vectors.npy,
        float16 since format 2; not projected)."""
        return self._vectors

    def query(self, vector: np.ndarray, top_k: int) -> list[Candidate]:
        """The ``top_k`` items nearest to ``vector`` (the bundle's descriptor, any scale; projected here when the
        generation is catalog-adapted; cosine), best first. An empty catalog returns []."""
        if int(top_k) < 1:
            raise CatalogIndexError(f"top_k must be >= 1, got {top_k}")
        if (ann := self._ann) is None:
            raise CatalogIndexError(f"index {self._gen_dir} is closed")
        if not self.size:
            return []
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.size != self.dim:
            raise CatalogIndexError(f"query vector has dim {v.size} but index {self._gen_dir} has dim "
                                    f"{self.dim}; was it built with another encoder? {REBUILD_HINT}")
        if not np.all(np.isfinite(v)):
            raise CatalogIndexError("query vector has NaN or infinite values")
        if self.projection is not None:
            v = self.projection.apply(v)
        # Several vectors per item: ask for enough neighbours to still find top_k distinct items.
        n_vec = int(top_k) * self._views_max
        rows, dists = ann.get_nns_by_vector(v.tolist(), n_vec, self._search_k, include_distances=True)
        scores = angular_to_cosine(np.asarray(dists, dtype=np.float64))
        best: dict[int, float] = {}
        for r, s in zip(rows, scores):  # nearest first: the first vector seen of an item is its max
            item = int(self._owners[r])
            if item not in best:
                best[item] = float(s)
        out = [Candidate.of_entry(self._table.id(i), self._table.label(i), s, self._table.attributes(i))
               for i, s in best.items()]
        # Annoy returns nearest first already; the stable sort only guards float ties after conversion.
        out.sort(key=lambda c: -c.score)
        return out[:int(top_k)]

    def features(self, item_id: str) -> Features | None:
        """Local features of ``item_id`` for spatial verification (None: verification is off for this
        index, see ``features_error``, or the item has none)."""
        if self._features is None:
            return None
        f = self._features.get(self._row(item_id))
        return f if len(f) else None

    @property
    def has_features(self) -> bool:
        """Whether spatial verification is possible with this index."""
        return self._features is not None

    def _item_vectors(self, row: int) -> np.ndarray:
        """All vectors (views) of the item at ``row``."""
        if self._by_item is None:  # built once, on the first rebuild: rows of each item, grouped
            order = np.argsort(self._owners, kind="stable")
            self._by_item = (order, np.searchsorted(self._owners[order], np.arange(self.size + 1)))
        order, starts = self._by_item
        return np.asarray(self._vectors[order[starts[row]:starts[row + 1]]])

    def stored_items(self, skip: set[str] | frozenset[str] = frozenset()) -> Iterator[CatalogItem]:
        """Every item as stored (vectors, thumbnail, source, features), except the ids in ``skip``: what a
        rebuild carries over into the next generation without re-encoding anything. One at a time, read from the
        maps while this generation stays open (a rebuild streams them to disk: memory does not grow with the
        catalog)."""
        for row in range(self.size):
            it = self._table.item(row)
            if it.id not in skip:
                yield CatalogItem(it.id, it.label, self._item_vectors(row), self._thumbnail_at(row), it.source,
                                  self._features.get(row) if self._features is not None else None, it.attributes)

    def current(self) -> CatalogIndex:
        """This generation: a loaded index never changes (``IndexHolder.current()`` follows enrolments)."""
        return self

    def close(self) -> None:
        """Unload the Annoy index and drop the memory maps. Only when no other thread still queries
        this object (IndexHolder never closes a replaced index; garbage collection does)."""
        ann, self._ann = self._ann, None
        if ann is not None:
            ann.unload()
        if self._features is not None:
            self._features.close()
            self._features = None
        if self._thumbs_map is not None:
            with contextlib.suppress(BufferError):
                self._thumbs_map.close()
            self._thumbs_map = None

    def __enter__(self) -> CatalogIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CatalogIndex({self._gen_dir}, size={self.size}, dim={self.dim})"

    def _row(self, item_id: str) -> int:
        if (row := self._table.row(item_id)) is None:
            raise CatalogIndexError(f"id {item_id!r} is not in the catalog index {self._gen_dir}")
        return row

    def _thumbnail_at(self, row: int) -> bytes | None:
        if (span := self._table.thumb_span(row)) is None:
            return None
        off, length = span
        if length == 0:
            return b""
        if self._thumbs_map is None:
            raise CatalogIndexError(f"index {self._gen_dir} is closed")
        return bytes(self._thumbs_map[off:off + length])
