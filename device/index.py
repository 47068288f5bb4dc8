"""Reading the catalog index: one generation loaded (memory-mapped), queried, its features and thumbnails.
Writing a generation (build, fsync, rename, swap, lock) and enrol/remove live in device/index_writer.py.

On disk the index is a directory::

    var/catalog/
      .lock                  flock'd while a generation is written (CLI and server may both build)
      current -> gen-000007  the live generation; replaced with os.replace, so readers see old or new
      gen-000006/            the previous generation, kept (a reader that resolved it earlier still works)
      gen-000007/
        vectors.ann          Annoy, angular metric, ``n_trees`` trees (mmap-loaded)
        vectors.npy          float16 M x D (±1e-3), L2-normalised bundle descriptors that enrol/remove rebuild from
                             (no query reads it); M ≥ N: an item may have several vectors (multi-view enrolment)
        owners.npy           int32 [M]: the item row of each vector (absent = one vector per item)
        features.bin         ORB features of every item, one mmap file (verify.py FeatureStore); absent = none
        thumbs.bin           the items' JPEG thumbnails back to back (spans in items.bin)
        items.bin            the item table: ids, labels, sources, thumbnail spans, id search (items.py), mapped
        projection.npz       the catalog-adapted projection (device/adapt.py); absent = vectors used as they are
        meta.json            ``IndexMeta``: format_version, dim, metric, bundle_sha256, n_trees, created, ann_bytes,
                             vectors, features, projection, count, store [store id, change seq] (store.py)
"""
from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from typing_extensions import NotRequired, TypedDict

import numpy as np
from annoy import AnnoyIndex
from pydantic import BaseModel, ConfigDict, Field

from .adapt import PROJECTION_FILE, Projection
from .jsonfile import read_json_model
from .errors import CatalogIndexError
from .items import IndexedItem, ItemTable
from .results import Candidate
from .verify import Features, FeatureStore

FORMAT_VERSION = 2  # 2: the item table in items.bin, float16 vectors.npy; 1 (items in meta.json) is still read
METRIC = "angular"
CURRENT = "current"
META_FILE = "meta.json"
ANN_FILE = "vectors.ann"
NPY_FILE = "vectors.npy"
OWNERS_FILE = "owners.npy"
FEATURES_FILE = "features.bin"
THUMBS_FILE = "thumbs.bin"
ITEMS_FILE = "items.bin"
TMP_PREFIX = ".tmp-"
_BUILD_HINT = "run `python -m device index build --catalog DIR`"
_REBUILD_HINT = "rebuild it with `python -m device index build`"


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


class _MetaItem(TypedDict):  # format 1 only; plain dicts, not a model object per item
    id: str
    label: str
    source: NotRequired[Optional[str]]


class IndexMeta(BaseModel):
    """``meta.json`` of a generation. Written by device/index_writer.py, validated here on load."""

    model_config = ConfigDict(extra="ignore", strict=True)
    format_version: Literal[1, 2]
    dim: int = Field(ge=0)
    metric: Literal["angular"]
    bundle_sha256: str = Field(min_length=1)
    n_trees: int = Field(ge=1)
    created: str
    ann_bytes: int = Field(ge=0)
    vectors: Optional[int] = Field(None, ge=0, description="absent in old files: one vector per item")
    features: bool = False
    projection: Optional[dict[str, int]] = Field(None, description="dim, fit_items, views_per_item of projection.npz")
    store: Optional[tuple[str, int]] = Field(None, description="(catalog store id, highest change seq it holds)")
    count: Optional[int] = Field(None, ge=0, description="items (format 2; in items.bin)")
    items: list[_MetaItem] = Field(default_factory=list, description="format 1 only")
    thumbs: list[Optional[tuple[int, int]]] = Field(default_factory=list, description="format 1 only")


def angular_to_cosine(distance: float | np.ndarray) -> float | np.ndarray:
    """Annoy's angular distance ``sqrt(2 - 2 cos)`` back to cosine similarity, clipped to [-1, 1]."""
    return np.clip(1.0 - np.square(distance) / 2.0, -1.0, 1.0)


def index_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an index with a live generation (without loading it)."""
    return read_current_name(Path(path)) is not None


def read_current_name(root: Path) -> str | None:
    """The generation directory name ``current`` points to, or None when there is none."""
    try:
        return os.readlink(root / CURRENT)
    except OSError:
        return None


class CatalogIndex:
    """One loaded (read-only) generation of the catalog index. Queries are thread-safe."""

    def __init__(self, gen_dir: Path, meta: IndexMeta, table: ItemTable, ann: AnnoyIndex, vectors: np.ndarray,
                 thumbs: mmap.mmap | None, *, search_k: int = -1, owners: np.ndarray | None = None,
                 features: FeatureStore | None = None, features_error: str | None = None,
                 projection: Projection | None = None):
        """Use :meth:`load`; this constructor takes already-validated parts."""
        self._gen_dir = gen_dir
        self.projection = projection  # catalog-adapted Lw: Annoy holds projected vectors, vectors.npy the raw
        self._owners = owners if owners is not None else np.arange(len(vectors), dtype=np.int32)
        self._views_max = int(np.bincount(self._owners).max()) if len(self._owners) else 1
        self._features, self.features_error = features, features_error
        self._by_item: tuple[np.ndarray, np.ndarray] | None = None
        self._ann: AnnoyIndex | None = ann
        self._vectors = vectors
        self._thumbs_map = thumbs
        self._table = table  # mapped: no Python object per item (a format-1 meta's lists are dropped here)
        self._meta = meta.model_copy(update={"items": [], "thumbs": []})
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
                                    f"generation symlink; {_BUILD_HINT}")
        # Resolve once: every file below comes from this generation even if `current` moves meanwhile.
        gen_dir = root / target
        if not gen_dir.is_dir():
            raise CatalogIndexError(f"{current} points to {gen_dir}, which does not exist; {_BUILD_HINT}")
        return cls.load_generation(gen_dir, expected_bundle_sha256=expected_bundle_sha256, search_k=search_k,
                                   require_features=require_features)

    @classmethod
    def load_generation(cls, gen_dir: str | os.PathLike, *, expected_bundle_sha256: str | None,
                        search_k: int = -1, require_features: bool = False) -> CatalogIndex:
        """Load one generation directory (``gen-N``) directly; see :meth:`load`."""
        gen_dir = Path(gen_dir)
        meta = _read_meta(gen_dir)
        sha = meta.bundle_sha256
        if expected_bundle_sha256 is not None and sha != expected_bundle_sha256:
            raise CatalogIndexError(
                f"index {gen_dir} was built with bundle sha256 {sha[:12]}… but the encoder is "
                f"{expected_bundle_sha256[:12]}… (meta.json field bundle_sha256); {_REBUILD_HINT}")
        n, dim = (len(meta.items) if meta.count is None else meta.count), meta.dim
        m = meta.vectors if meta.vectors is not None else n

        npy = gen_dir / NPY_FILE
        _require(npy)
        try:
            vectors = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CatalogIndexError(f"{npy} is unreadable ({e}); {_REBUILD_HINT}") from None
        if vectors.ndim != 2 or vectors.dtype not in (np.float16, np.float32):
            raise CatalogIndexError(f"{npy} must be a float16 N x D array, got {vectors.dtype} {vectors.shape}; "
                                    f"{_REBUILD_HINT}")
        if vectors.shape[0] != m:
            raise CatalogIndexError(f"{npy} has {vectors.shape[0]} rows but {gen_dir / META_FILE} says "
                                    f"{m} (fields vectors/items); {_REBUILD_HINT}")
        owners = None
        if (gen_dir / OWNERS_FILE).is_file():
            try:
                owners = np.load(gen_dir / OWNERS_FILE, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CatalogIndexError(f"{gen_dir / OWNERS_FILE} is unreadable ({e}); {_REBUILD_HINT}") from None
            if owners.shape != (m,) or (m and (owners.min() < 0 or owners.max() >= n)):
                raise CatalogIndexError(f"{gen_dir / OWNERS_FILE} does not map {m} vectors to {n} items; "
                                        f"{_REBUILD_HINT}")
        elif m != n:
            raise CatalogIndexError(f"{gen_dir / OWNERS_FILE} is missing; {_REBUILD_HINT}")
        if n and vectors.shape[1] != dim:
            raise CatalogIndexError(f"{npy} holds vectors of dim {vectors.shape[1]} but "
                                    f"{gen_dir / META_FILE} says dim {dim}; {_REBUILD_HINT}")

        ann_path = gen_dir / ANN_FILE
        _require(ann_path)
        size = ann_path.stat().st_size
        if size != meta.ann_bytes:
            raise CatalogIndexError(f"{ann_path} is {size} bytes but {gen_dir / META_FILE} recorded "
                                    f"{meta.ann_bytes} (field ann_bytes): the file is corrupt; {_REBUILD_HINT}")
        projection = None
        if meta.projection is not None:
            projection = Projection.load(gen_dir / PROJECTION_FILE, bundle_sha256=sha)
            if projection.in_dim != dim or projection.dim != meta.projection.get("dim"):
                raise CatalogIndexError(f"{gen_dir / PROJECTION_FILE} maps {projection.in_dim} → {projection.dim} "
                                        f"dims but {gen_dir / META_FILE} says {dim} → {meta.projection}; {_REBUILD_HINT}")
        ann_dim = projection.dim if projection is not None else dim
        ann = AnnoyIndex(max(ann_dim, 1), METRIC)
        try:
            ann.load(str(ann_path))  # mmap
        except OSError as e:
            raise CatalogIndexError(f"{ann_path} could not be loaded as an Annoy angular index of dim "
                                    f"{dim} ({e}); {_REBUILD_HINT}") from None
        if ann.get_n_items() != m:
            ann.unload()
            raise CatalogIndexError(f"{ann_path} holds {ann.get_n_items()} vectors of dim {dim} but "
                                    f"{gen_dir / META_FILE} says {m} (fields dim/vectors); {_REBUILD_HINT}")
        features, features_error = None, None
        if meta.features:
            try:
                features = FeatureStore.open(gen_dir / FEATURES_FILE)
                if len(features) != n:
                    raise CatalogIndexError(f"{gen_dir / FEATURES_FILE} holds features of {len(features)} "
                                            f"items but the index has {n}; {_REBUILD_HINT}")
            except CatalogIndexError as e:
                if require_features:
                    ann.unload()
                    raise
                features, features_error = None, str(e)
        elif require_features:
            ann.unload()
            raise CatalogIndexError(f"{gen_dir / FEATURES_FILE} is missing: built without local features; {_REBUILD_HINT}")
        else:
            features_error = "the index was built without local features"

        thumbs_path = gen_dir / THUMBS_FILE
        _require(thumbs_path)
        thumbs_size = thumbs_path.stat().st_size
        try:
            table = _item_table(gen_dir, meta, n, thumbs_size)
        except CatalogIndexError:
            ann.unload()
            raise
        thumbs = None
        if thumbs_size:
            with open(thumbs_path, "rb") as f:
                thumbs = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return cls(gen_dir, meta, table, ann, vectors, thumbs, search_k=search_k, owners=owners, features=features,
                   features_error=features_error, projection=projection)

    # -- properties
    @property
    def dim(self) -> int:
        """Descriptor dimension (0 only for an empty catalog built without one)."""
        return self._meta.dim

    @property
    def size(self) -> int:
        """Number of items."""
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
        """(id of the catalog store, highest change seq) this generation holds (device/store.py); None: no store."""
        return self._meta.store

    @property
    def items(self) -> list[IndexedItem]:
        """id / label / source of every item, in vector order (made on demand: one object per item)."""
        return [self._table.item(row) for row in range(len(self._table))]

    # -- lookups
    def has(self, item_id: str) -> bool:
        """Whether ``item_id`` is in this generation."""
        return self._table.row(item_id) is not None

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
                                    f"{self.dim}; was it built with another encoder? {_REBUILD_HINT}")
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
        out = [Candidate(self._table.id(i), self._table.label(i), s) for i, s in best.items()]
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

    def stored_items(self, skip: set[str] | frozenset[str] = frozenset()) -> list[CatalogItem]:
        """Every item as stored (vectors, thumbnail, source, features), except the ids in ``skip``: what a
        rebuild carries over into the next generation without re-encoding anything."""
        return [CatalogItem(it.id, it.label, self._item_vectors(row), self._thumbnail_at(row), it.source,
                            self._features.get(row) if self._features is not None else None)
                for row, it in enumerate(self.items) if it.id not in skip]

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


def _require(p: Path) -> None:
    if not p.is_file():
        raise CatalogIndexError(f"index file {p} is missing; {_BUILD_HINT}")


def _read_meta(gen_dir: Path) -> IndexMeta:
    meta_path = gen_dir / META_FILE
    _require(meta_path)
    meta = read_json_model(meta_path, IndexMeta, CatalogIndexError, format_version=FORMAT_VERSION,
                           hint=_REBUILD_HINT)
    if meta.format_version == 1 and len(meta.thumbs) != len(meta.items):
        raise CatalogIndexError(f"{meta_path}: field thumbs has {len(meta.thumbs)} entries for "
                                f"{len(meta.items)} items; {_REBUILD_HINT}")
    return meta


def _item_table(gen_dir: Path, meta: IndexMeta, n: int, thumbs_size: int) -> ItemTable:
    """items.bin mapped (format 2), or a format-1 meta.json's item lists packed into the same table."""
    if meta.format_version >= 2:
        _require(gen_dir / ITEMS_FILE)
        table = ItemTable.open(gen_dir / ITEMS_FILE, thumbs_size=thumbs_size)
        if len(table) != n:
            raise CatalogIndexError(f"{gen_dir / ITEMS_FILE} holds {len(table)} items but {gen_dir / META_FILE} "
                                    f"says {n} (field count); {_REBUILD_HINT}")
        return table
    for item, span in zip(meta.items, meta.thumbs):
        if span is not None and (span[0] < 0 or span[1] < 0 or span[0] + span[1] > thumbs_size):
            raise CatalogIndexError(f"{gen_dir / META_FILE}: thumbs entry of {item['id']!r} points "
                                    f"outside {gen_dir / THUMBS_FILE} ({thumbs_size} bytes); {_REBUILD_HINT}")
    return ItemTable.build([d["id"] for d in meta.items], [d["label"] for d in meta.items],
                           [d.get("source") for d in meta.items], meta.thumbs)
