"""One generation of the catalog index on disk (a ``gen-NNNNNN`` folder, edge_retrieval/index/reader.py): the names of its files,
``meta.json``, and how a generation is written — item by item, in bounded memory (``GenerationWriter``) — and
opened and checked (``open_generation``). The item table's file format is edge_retrieval/index/item_table.py, the features'
edge_retrieval/index/feature_store.py; searching a generation is edge_retrieval/index/reader.py, making one live (lock, rename, swap)
edge_retrieval/index/writer.py::

    vectors.ann      Annoy, angular metric, ``n_trees`` trees (mmap-loaded)
    vectors.npy      float16 M x D (±1e-3), L2-normalised bundle descriptors that enrol/remove rebuild from
                     (no query reads it); M ≥ N: an item may have several vectors (multi-view enrolment)
    owners.npy       int32 [M]: the item row of each vector (absent = one vector per item)
    features.bin     ORB features of every item, one mmap file (feature_store.py); absent = none
    thumbs.bin       the items' JPEG thumbnails back to back (spans in items.bin)
    items.bin        the item table: ids, labels, sources, thumbnail spans, id search (items.py), mapped
    projection.npz   the catalog-adapted projection (adapt.py): mean [d_in], matrix [dim, d_in], fit size, the
                     bundle's sha256; absent = vectors used as they are
    meta.json        ``IndexMeta``: format_version, dim, metric, bundle_sha256, n_trees, created, ann_bytes,
                     vectors, features, projection, count, store [store id, change seq] (store.py)
"""
from __future__ import annotations

import datetime as _dt
import io
import mmap
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from annoy import AnnoyIndex
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import NotRequired, TypedDict

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.core.jsonfile import read_json_model
from edge_retrieval.index.ann_build import METRIC, build_ann
from edge_retrieval.index.feature_store import FeatureStore, FeatureWriter
from edge_retrieval.index.file_checks import check_ann_file, check_finite
from edge_retrieval.index.item_table import ItemTable
from edge_retrieval.model.adaptation import Projection
from edge_retrieval.model.local_features import Features

FORMAT_VERSION = 2  # 2: the item table in items.bin, float16 vectors.npy; 1 (items in meta.json) is still read
META_FILE = "meta.json"
ANN_FILE = "vectors.ann"
NPY_FILE = "vectors.npy"
OWNERS_FILE = "owners.npy"
FEATURES_FILE = "features.bin"
THUMBS_FILE = "thumbs.bin"
ITEMS_FILE = "items.bin"
PROJECTION_FILE = "projection.npz"
BUILD_HINT = "run `python -m edge_retrieval index build --catalog DIR`"
REBUILD_HINT = "rebuild it with `python -m edge_retrieval index build`"


class _MetaItem(TypedDict):  # format 1 only; plain dicts, not a model object per item
    id: str
    label: str
    source: NotRequired[Optional[str]]


class IndexMeta(BaseModel):
    """``meta.json`` of a generation. Written by ``GenerationWriter.finish``, validated by ``open_generation``."""

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


def save_projection(projection: Projection, path: str | os.PathLike) -> None:
    """Write ``projection.npz`` and fsync it (the caller fsyncs its generation folder)."""
    with open(path, "wb") as f:
        np.savez(f, mean=projection.mean, matrix=projection.matrix,
                 fit=np.array([projection.fit_items, projection.views_per_item]),
                 bundle_sha256=np.array(projection.bundle_sha256))
        _fsync_file(f)


def load_projection(path: str | os.PathLike, *, bundle_sha256: str) -> Projection:
    """Read ``projection.npz``; CatalogIndexError when it is unreadable or was made for another bundle."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            mean, matrix, fit, sha = z["mean"], z["matrix"], z["fit"], str(z["bundle_sha256"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a truncated .npz: BadZipFile
        raise CatalogIndexError(f"{path} is missing or unreadable ({e}); {REBUILD_HINT}") from None
    if sha != bundle_sha256:
        raise CatalogIndexError(f"{path} was fitted for bundle sha256 {sha[:12]}… but the index holds vectors "
                                f"of bundle {bundle_sha256[:12]}…; rebuild the index")
    if matrix.ndim != 2 or mean.shape != (matrix.shape[1],) or not np.isfinite(matrix).all():
        raise CatalogIndexError(f"{path}: mean {mean.shape} and matrix {matrix.shape} do not fit; rebuild the index")
    return Projection(mean.astype(np.float32), matrix.astype(np.float32), int(fit[0]), int(fit[1]), sha)


def item_vectors(n: int, item_id: object, vector: np.ndarray, thumbnail_jpeg: object, dim: int | None) -> np.ndarray:
    """The vectors [V, dim] of item #``n`` L2-normalised as float16 — what vectors.npy keeps, so a fresh build and
    a rebuild search the same vectors —; CatalogIndexError names the id when the id, a vector (dim, NaN, zero)
    or the thumbnail is bad. ``dim`` None: any (the first item fixes it)."""
    if not isinstance(item_id, str) or not item_id.strip():
        raise CatalogIndexError(f"catalog item #{n} has an empty id; every item needs a unique id")
    v = np.asarray(vector, dtype=np.float32)
    v = v.reshape(1, -1) if v.ndim <= 1 else v
    if v.ndim != 2 or v.shape[1] != (dim or v.shape[1]) or v.size == 0:
        raise CatalogIndexError(
            f"catalog item {item_id!r}: vector has dim {v.shape[-1]}, expected dim {dim or v.shape[-1]} (all "
            "vectors must come from the same encoder)")
    if not np.all(np.isfinite(v)):
        raise CatalogIndexError(f"catalog item {item_id!r}: vector has NaN or infinite values")
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    if float(norm.min()) < 1e-12:
        raise CatalogIndexError(f"catalog item {item_id!r}: vector is all zeros")
    if thumbnail_jpeg is not None and not isinstance(thumbnail_jpeg, (bytes, bytearray, memoryview)):
        raise CatalogIndexError(f"catalog item {item_id!r}: thumbnail_jpeg must be bytes or None")
    return (v / norm).astype(np.float16)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


class _NpyAppender:
    """An .npy file written block by block: room for the header is kept at the front and filled in by
    :meth:`finish` with the final shape — the very bytes ``np.save`` writes (any realistic shape's header is
    as long as the room)."""

    def __init__(self, path: Path, dtype, ndim: int):
        self.path, self.dtype, self.rows = path, np.dtype(dtype), 0
        self._room = len(_npy_header(self.dtype, (2**62, 2**20)[:ndim]))
        self._f = open(path, "wb")
        self._f.write(b"\0" * self._room)

    def append(self, block: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(block, self.dtype).tobytes())
        self.rows += len(block)

    def finish(self, row_shape: tuple[int, ...]) -> None:
        header = _npy_header(self.dtype, (self.rows, *row_shape))
        if len(header) != self._room:
            raise CatalogIndexError(f"{self.path}: an .npy header of {len(header)} bytes for shape {self.rows}")
        self._f.seek(0)
        self._f.write(header)
        _fsync_file(self._f)
        self._f.close()

    def close(self) -> None:
        self._f.close()


class GenerationWriter:
    """Writes one generation into the empty folder ``folder`` as its items arrive (a build streams them from its
    workers), keeping a few bytes per item in memory: vectors, owners, features and thumbnails go to their files
    at once, ids / labels / sources wait for the item table. :meth:`finish` writes the item table, the projection,
    the Annoy trees (from vectors.npy, in chunks) and meta.json, and fsyncs it all; :meth:`close` abandons it.
    OSError propagates (the caller names the index folder)."""

    def __init__(self, folder: str | os.PathLike, *, dim: int | None = None):
        """``dim``: the encoder's descriptor size, every vector must have it (None: fixed by the first item)."""
        self.folder = Path(folder)
        self.dim = dim
        self.with_features = False  # features are all-or-nothing: an item without them gets an empty entry
        self._ids: list[str] = []
        self._labels: list[str] = []
        self._sources: list[str | None] = []
        self._attributes: list[dict[str, str]] = []
        self._spans: list[tuple[int, int] | None] = []
        self._seen: set[str] = set()
        self._thumbs_end = 0
        self._files: list = []
        self._vectors = self._open(lambda: _NpyAppender(self.folder / NPY_FILE, np.float16, 2))
        self._owners = self._open(lambda: _NpyAppender(self.folder / OWNERS_FILE, np.int32, 1))
        self._features = self._open(lambda: FeatureWriter(self.folder / FEATURES_FILE))
        self._thumbs = self._open(lambda: open(self.folder / THUMBS_FILE, "wb"))

    def _open(self, make):
        try:
            f = make()
        except BaseException:
            self.close()
            raise
        self._files.append(f)
        return f

    @property
    def count(self) -> int:
        """Items added so far."""
        return len(self._ids)

    def add(self, item_id: str, label: str, vector: np.ndarray, *, thumbnail_jpeg: bytes | None = None,
            source: str | None = None, features: Features | None = None,
            attributes: dict[str, str] | None = None) -> None:
        """The next entry (row ``count``; ``item_id`` is its key, edge_retrieval/core/photos.py): its vector(s) [D]
        or [V, D], thumbnail, source, features and the item's attributes; written at once. CatalogIndexError naming the id for a duplicate or bad id, vector or thumbnail."""
        n = self.count
        v = item_vectors(n, item_id, vector, thumbnail_jpeg, self.dim)
        if item_id in self._seen:
            raise CatalogIndexError(f"duplicate catalog id {item_id!r}; ids must be unique")
        self.dim = v.shape[1]
        self._vectors.append(v)
        self._owners.append(np.full(len(v), n, np.int32))
        if features is not None and not self.with_features:
            for _ in range(n):  # the items before it had none: empty entries
                self._features.add(Features.empty())
            self.with_features = True
        if self.with_features:
            self._features.add(features if features is not None else Features.empty())
        span = None
        if thumbnail_jpeg is not None:
            data = bytes(thumbnail_jpeg)
            self._thumbs.write(data)
            span, self._thumbs_end = (self._thumbs_end, len(data)), self._thumbs_end + len(data)
        self._seen.add(item_id)
        self._ids.append(item_id)
        self._labels.append(label)
        self._sources.append(source)
        self._attributes.append(dict(attributes or {}))
        self._spans.append(span)

    def finish(self, *, bundle_sha256: str, n_trees: int, projection: Projection | None = None,
               store: tuple[str, int] | None = None) -> IndexMeta:
        """Complete the generation: ``projection`` (made for the same bundle and dim) is stored and the Annoy index
        holds the projected vectors (vectors.npy keeps them as given); ``store`` is (catalog store id, highest
        change seq) the items hold (edge_retrieval/catalog/store.py). Returns its meta. CatalogIndexError for a bad argument."""
        dim = int(self.dim or 0)
        if projection is not None and (projection.bundle_sha256 != bundle_sha256 or projection.in_dim != dim):
            raise CatalogIndexError(f"write_index: the projection was fitted for bundle {projection.bundle_sha256[:12]}… "
                                    f"({projection.in_dim}-d), not {bundle_sha256[:12]}… ({dim}-d); rebuild the index")
        self._vectors.finish((dim,))
        self._owners.finish(())
        _fsync_file(self._thumbs)
        self._thumbs.close()
        if self.with_features:
            self._features.finish()
        else:
            self._features.close()
            (self.folder / FEATURES_FILE).unlink(missing_ok=True)
        ItemTable.build(self._ids, self._labels, self._sources, self._spans, self._attributes).write(self.folder / ITEMS_FILE)
        if projection is not None:
            save_projection(projection, self.folder / PROJECTION_FILE)
        ann_path = self.folder / ANN_FILE  # never through a writable mapping: a full disk is an error, not SIGBUS
        build_ann(ann_path, self.folder / NPY_FILE, projection, projection.dim if projection is not None else dim,
                  n_trees)
        meta = IndexMeta(
            format_version=FORMAT_VERSION, dim=dim, metric=METRIC, bundle_sha256=bundle_sha256, n_trees=int(n_trees),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            ann_bytes=ann_path.stat().st_size, vectors=self._vectors.rows, features=self.with_features,
            projection=None if projection is None else {"dim": projection.dim, "fit_items": projection.fit_items,
                                                        "views_per_item": projection.views_per_item},
            count=self.count, store=store)
        with open(self.folder / META_FILE, "w", encoding="utf-8") as f:
            f.write(meta.model_dump_json(indent=1))
            _fsync_file(f)
        fsync_dir(self.folder)
        return meta

    def close(self) -> None:
        """Close what is still open (an abandoned build; the caller removes the folder)."""
        for f in self._files:
            f.close()


@dataclass
class Generation:
    """The checked, opened parts of one generation (what ``CatalogIndex`` serves)."""

    path: Path
    meta: IndexMeta
    table: ItemTable
    ann: AnnoyIndex
    vectors: np.ndarray
    owners: np.ndarray | None
    thumbs: mmap.mmap | None
    features: FeatureStore | None
    features_error: str | None
    projection: Projection | None


def open_generation(gen_dir: str | os.PathLike, *, expected_bundle_sha256: str | None,
                    require_features: bool = False) -> Generation:
    """Open and check one generation folder: files memory-mapped, not read. With ``expected_bundle_sha256`` it must
    have been built with that bundle. A missing or corrupt features.bin is an error with ``require_features``,
    else the generation opens without verification (``features_error``). Raises CatalogIndexError naming the
    missing or bad file or field."""
    gen_dir = Path(gen_dir)
    meta = _read_meta(gen_dir)
    sha = meta.bundle_sha256
    if expected_bundle_sha256 is not None and sha != expected_bundle_sha256:
        raise CatalogIndexError(
            f"index {gen_dir} was built with bundle sha256 {sha[:12]}… but the encoder is "
            f"{expected_bundle_sha256[:12]}… (meta.json field bundle_sha256); {REBUILD_HINT}")
    n, dim = (len(meta.items) if meta.count is None else meta.count), meta.dim
    m = meta.vectors if meta.vectors is not None else n

    npy = gen_dir / NPY_FILE
    _require(npy)
    try:
        vectors = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CatalogIndexError(f"{npy} is unreadable ({e}); {REBUILD_HINT}") from None
    if vectors.ndim != 2 or vectors.dtype not in (np.float16, np.float32):
        raise CatalogIndexError(f"{npy} must be a float16 N x D array, got {vectors.dtype} {vectors.shape}; "
                                f"{REBUILD_HINT}")
    if vectors.shape[0] != m:
        raise CatalogIndexError(f"{npy} has {vectors.shape[0]} rows but {gen_dir / META_FILE} says "
                                f"{m} (fields vectors/items); {REBUILD_HINT}")
    owners = None
    if (gen_dir / OWNERS_FILE).is_file():
        try:
            owners = np.load(gen_dir / OWNERS_FILE, mmap_mode="r", allow_pickle=False)  # mapped: 12 MB at 3M vectors
        except (OSError, ValueError) as e:
            raise CatalogIndexError(f"{gen_dir / OWNERS_FILE} is unreadable ({e}); {REBUILD_HINT}") from None
        if owners.shape != (m,) or (m and (owners.min() < 0 or owners.max() >= n)):
            raise CatalogIndexError(f"{gen_dir / OWNERS_FILE} does not map {m} vectors to {n} items; "
                                    f"{REBUILD_HINT}")
    elif m != n:
        raise CatalogIndexError(f"{gen_dir / OWNERS_FILE} is missing; {REBUILD_HINT}")
    if n and vectors.shape[1] != dim:
        raise CatalogIndexError(f"{npy} holds vectors of dim {vectors.shape[1]} but "
                                f"{gen_dir / META_FILE} says dim {dim}; {REBUILD_HINT}")
    check_finite(vectors, npy, REBUILD_HINT)

    ann_path = gen_dir / ANN_FILE
    _require(ann_path)
    size = ann_path.stat().st_size
    if size != meta.ann_bytes:
        raise CatalogIndexError(f"{ann_path} is {size} bytes but {gen_dir / META_FILE} recorded "
                                f"{meta.ann_bytes} (field ann_bytes): the file is corrupt; {REBUILD_HINT}")
    projection = None
    if meta.projection is not None:
        projection = load_projection(gen_dir / PROJECTION_FILE, bundle_sha256=sha)
        if projection.in_dim != dim or projection.dim != meta.projection.get("dim"):
            raise CatalogIndexError(f"{gen_dir / PROJECTION_FILE} maps {projection.in_dim} → {projection.dim} "
                                    f"dims but {gen_dir / META_FILE} says {dim} → {meta.projection}; {REBUILD_HINT}")
    ann_dim = projection.dim if projection is not None else dim
    check_ann_file(ann_path, ann_dim, m, REBUILD_HINT)  # a child index out of range would SIGSEGV a query
    ann = AnnoyIndex(max(ann_dim, 1), METRIC)
    try:
        ann.load(str(ann_path))  # mmap
    except OSError as e:
        raise CatalogIndexError(f"{ann_path} could not be loaded as an Annoy angular index of dim "
                                f"{dim} ({e}); {REBUILD_HINT}") from None
    if ann.get_n_items() != m:
        ann.unload()
        raise CatalogIndexError(f"{ann_path} holds {ann.get_n_items()} vectors of dim {dim} but "
                                f"{gen_dir / META_FILE} says {m} (fields dim/vectors); {REBUILD_HINT}")
    features, features_error = None, None
    if meta.features:
        try:
            features = FeatureStore.open(gen_dir / FEATURES_FILE)
            if len(features) != n:
                raise CatalogIndexError(f"{gen_dir / FEATURES_FILE} holds features of {len(features)} "
                                        f"items but the index has {n}; {REBUILD_HINT}")
        except CatalogIndexError as e:
            if require_features:
                ann.unload()
                raise
            features, features_error = None, str(e)
    elif require_features:
        ann.unload()
        raise CatalogIndexError(f"{gen_dir / FEATURES_FILE} is missing: built without local features; {REBUILD_HINT}")
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
    return Generation(gen_dir, meta, table, ann, vectors, owners, thumbs, features, features_error, projection)


def _fsync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(d: Path) -> None:
    """fsync a folder, so that the names created or removed in it survive a power cut."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require(p: Path) -> None:
    if not p.is_file():
        raise CatalogIndexError(f"index file {p} is missing; {BUILD_HINT}")


def _read_meta(gen_dir: Path) -> IndexMeta:
    meta_path = gen_dir / META_FILE
    _require(meta_path)
    meta = read_json_model(meta_path, IndexMeta, CatalogIndexError, format_version=FORMAT_VERSION,
                           hint=REBUILD_HINT)
    if meta.format_version == 1 and len(meta.thumbs) != len(meta.items):
        raise CatalogIndexError(f"{meta_path}: field thumbs has {len(meta.thumbs)} entries for "
                                f"{len(meta.items)} items; {REBUILD_HINT}")
    return meta


def _item_table(gen_dir: Path, meta: IndexMeta, n: int, thumbs_size: int) -> ItemTable:
    """items.bin mapped (format 2), or a format-1 meta.json's item lists packed into the same table."""
    if meta.format_version >= 2:
        _require(gen_dir / ITEMS_FILE)
        table = ItemTable.open(gen_dir / ITEMS_FILE, thumbs_size=thumbs_size)
        if len(table) != n:
            raise CatalogIndexError(f"{gen_dir / ITEMS_FILE} holds {len(table)} items but {gen_dir / META_FILE} "
                                    f"says {n} (field count); {REBUILD_HINT}")
        return table
    for item, span in zip(meta.items, meta.thumbs):
        if span is not None and (span[0] < 0 or span[1] < 0 or span[0] + span[1] > thumbs_size):
            raise CatalogIndexError(f"{gen_dir / META_FILE}: thumbs entry of {item['id']!r} points "
                                    f"outside {gen_dir / THUMBS_FILE} ({thumbs_size} bytes); {REBUILD_HINT}")
    return ItemTable.build([d["id"] for d in meta.items], [d["label"] for d in meta.items],
                           [d.get("source") for d in meta.items], meta.thumbs)
