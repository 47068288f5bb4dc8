"""The catalog index: build, load (mmap), query, and swap generations atomically.

On disk the index is a directory::

    var/catalog/
      .lock                  flock'd while a generation is written (CLI and server may both build)
      current -> gen-000007  the live generation; replaced with os.replace, so readers see old or new
      gen-000006/            the previous generation, kept (a reader that resolved it earlier still works)
      gen-000007/
        vectors.ann          Annoy, angular metric, ``n_trees`` trees (mmap-loaded)
        vectors.npy          float32 M x D, L2-normalised; enrol/remove rebuild from it without re-encoding.
                             M ≥ N: an item may have several vectors (multi-view enrolment)
        owners.npy           int32 [M]: the item row of each vector (absent = one vector per item)
        features.bin         local features (ORB) of every item for spatial verification, one mmap file
                             (device/verify.py FeatureStore); absent when the catalog was built without them
        thumbs.bin           the items' JPEG thumbnails back to back; ``meta["thumbs"]`` holds [offset, length]
        meta.json            format_version, dim, metric, bundle_sha256, n_trees, created, ann_bytes,
                             items [{id, label, source}] in vector order, thumbs [[offset, length] | null]

A generation is written in ``.tmp-gen-XXXX``, fsynced, renamed to ``gen-N`` and only then made live by
replacing the ``current`` symlink. A crash before that replace leaves ``current`` on the old, intact
generation; the leftovers (``.tmp-*`` folders, an orphan ``gen-N``) are removed by the next build.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import fcntl
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from device.errors import CatalogIndexError
from device.results import Candidate
from device.verify import Features, FeatureStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METRIC = "angular"
CURRENT = "current"
META_FILE = "meta.json"
ANN_FILE = "vectors.ann"
NPY_FILE = "vectors.npy"
OWNERS_FILE = "owners.npy"
FEATURES_FILE = "features.bin"
THUMBS_FILE = "thumbs.bin"
TMP_PREFIX = ".tmp-"
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
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


@dataclass(frozen=True)
class IndexedItem:
    """What the index knows about an item besides its vector (in vector order)."""

    id: str
    label: str
    source: str | None

    def to_json(self) -> dict:
        """The item as the JSON object stored in meta.json and served by the web API."""
        return {"id": self.id, "label": self.label, "source": self.source}


# --------------------------------------------------------------------------------------------- maths

def angular_to_cosine(distance: float | np.ndarray) -> float | np.ndarray:
    """Annoy's angular distance ``sqrt(2 - 2 cos)`` back to cosine similarity, clipped to [-1, 1]."""
    return np.clip(1.0 - np.square(distance) / 2.0, -1.0, 1.0)


def cosine_to_angular(cosine: float | np.ndarray) -> float | np.ndarray:
    """Cosine similarity to Annoy's angular distance ``sqrt(2 - 2 cos)``."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(cosine, dtype=np.float64), 0.0))


def exact_query(vectors: np.ndarray, q: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine search: the ``top_k`` rows of ``vectors`` (N x D, L2-normalised) nearest
    to ``q``, as (row indices, cosine scores), best first. The ground truth for recall checks."""
    vectors = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(q, dtype=np.float32).reshape(-1)
    n = len(vectors)
    k = min(int(top_k), n)
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    scores = vectors @ q
    top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    top = top[np.argsort(-scores[top], kind="stable")]
    return top.astype(np.int64), scores[top]


# ----------------------------------------------------------------------------------------- writing

def write_index(
    path: str | os.PathLike,
    items: Sequence[CatalogItem],
    *,
    bundle_sha256: str,
    n_trees: int = 50,
    dim: int | None = None,
) -> Path:
    """Write ``items`` as a new generation under the index directory ``path`` and make it live.

    Vectors are L2-normalised on the way in. ``dim``, when given, is the encoder's descriptor size and
    every vector must have it; an empty catalog (a fresh appliance) is allowed and then records
    ``dim`` (0 when not given: fixed by the first enrolment). Returns the new generation directory.
    Raises CatalogIndexError naming the offending id / field, or the path that could not be written.
    """
    root = Path(path)
    vectors, owners, dim = _validate_items(items, dim)
    if not isinstance(bundle_sha256, str) or not bundle_sha256:
        raise CatalogIndexError("write_index: bundle_sha256 must be the encoder bundle's sha256 (non-empty)")
    if int(n_trees) < 1:
        raise CatalogIndexError(f"write_index: n_trees must be >= 1, got {n_trees}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CatalogIndexError(f"cannot create the index directory {root}: {e}") from e

    with _build_lock(root):
        _remove_leftovers(root)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}gen-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the server may run as another user than the CLI
        gen_dir: Path | None = None
        try:
            _write_generation(tmp, items, vectors, owners, dim=dim, bundle_sha256=bundle_sha256,
                              n_trees=int(n_trees))
            gen_dir = root / f"gen-{_next_generation_number(root):06d}"
            os.rename(tmp, gen_dir)
            previous = _read_current_name(root)
            link_tmp = root / f"{TMP_PREFIX}current-{os.getpid()}-{threading.get_ident()}"
            with contextlib.suppress(FileNotFoundError):
                link_tmp.unlink()
            os.symlink(gen_dir.name, link_tmp)
            os.replace(link_tmp, root / CURRENT)
            _fsync_dir(root)
        except BaseException as e:
            # The old generation is still live; drop what this attempt wrote. (A hard crash leaves it
            # behind instead, and the next build's _remove_leftovers takes care of it.)
            if gen_dir is None or not gen_dir.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            elif _read_current_name(root) != gen_dir.name:
                shutil.rmtree(gen_dir, ignore_errors=True)
            for leftover in root.glob(f"{TMP_PREFIX}current-*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if isinstance(e, OSError):
                raise CatalogIndexError(f"could not write a new index generation in {root}: {e}") from e
            raise
        _remove_old_generations(root, keep={gen_dir.name, previous})
    return gen_dir


def _validate_items(items: Sequence[CatalogItem], dim: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    seen: set[str] = set()
    rows = []
    owners: list[int] = []
    for n, item in enumerate(items):
        if not isinstance(item.id, str) or not item.id.strip():
            raise CatalogIndexError(f"catalog item #{n} has an empty id; every item needs a unique id")
        if item.id in seen:
            raise CatalogIndexError(f"duplicate catalog id {item.id!r}; ids must be unique")
        seen.add(item.id)
        v = np.asarray(item.vector, dtype=np.float32)
        v = v.reshape(1, -1) if v.ndim <= 1 else v
        if dim is None:
            dim = v.shape[1]
        if v.ndim != 2 or v.shape[1] != dim or v.size == 0:
            raise CatalogIndexError(
                f"catalog item {item.id!r}: vector has dim {v.shape[-1]}, expected dim {dim} (all vectors "
                "must come from the same encoder)")
        if not np.all(np.isfinite(v)):
            raise CatalogIndexError(f"catalog item {item.id!r}: vector has NaN or infinite values")
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        if float(norm.min()) < 1e-12:
            raise CatalogIndexError(f"catalog item {item.id!r}: vector is all zeros")
        if item.thumbnail_jpeg is not None and not isinstance(item.thumbnail_jpeg, (bytes, bytearray, memoryview)):
            raise CatalogIndexError(f"catalog item {item.id!r}: thumbnail_jpeg must be bytes or None")
        rows.append(v / norm)
        owners.extend([n] * len(v))
    dim = int(dim or 0)
    vectors = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, dim), dtype=np.float32)
    return vectors, np.asarray(owners, dtype=np.int32), dim


def _write_generation(gen: Path, items: Sequence[CatalogItem], vectors: np.ndarray, owners: np.ndarray, *,
                      dim: int, bundle_sha256: str, n_trees: int) -> None:
    for name, array in ((NPY_FILE, vectors), (OWNERS_FILE, owners)):
        with open(gen / name, "wb") as f:
            np.save(f, array, allow_pickle=False)
            _fsync_file(f)
    # Features are all-or-nothing: an item without them gets an empty entry (never verified).
    with_features = any(it.features is not None for it in items)
    if with_features:
        FeatureStore.write(gen / FEATURES_FILE, [it.features if it.features is not None
                                                 else Features.empty() for it in items])

    thumbs: list[list[int] | None] = []
    with open(gen / THUMBS_FILE, "wb") as f:
        offset = 0
        for item in items:
            if item.thumbnail_jpeg is None:
                thumbs.append(None)
                continue
            data = bytes(item.thumbnail_jpeg)
            f.write(data)
            thumbs.append([offset, len(data)])
            offset += len(data)
        _fsync_file(f)

    ann = AnnoyIndex(max(dim, 1), METRIC)
    ann.set_seed(0)  # same catalog, same trees: builds are reproducible
    for i, v in enumerate(vectors):
        ann.add_item(i, v)
    ann.build(n_trees)
    ann.save(str(gen / ANN_FILE))
    ann.unload()
    with open(gen / ANN_FILE, "rb") as f:
        os.fsync(f.fileno())

    meta = {
        "format_version": FORMAT_VERSION,
        "dim": dim,
        "metric": METRIC,
        "bundle_sha256": bundle_sha256,
        "n_trees": n_trees,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ann_bytes": (gen / ANN_FILE).stat().st_size,
        "vectors": int(len(vectors)),
        "features": with_features,
        "items": [{"id": it.id, "label": it.label, "source": it.source} for it in items],
        "thumbs": thumbs,
    }
    with open(gen / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        _fsync_file(f)
    _fsync_dir(gen)


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    # flock, not only a threading lock: the CLI and the server may build the same directory.
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def index_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an index with a live generation (without loading it)."""
    return _read_current_name(Path(path)) is not None


def _read_current_name(root: Path) -> str | None:
    try:
        return os.readlink(root / CURRENT)
    except OSError:
        return None


def _generation_dirs(root: Path) -> dict[str, int]:
    return {p.name: int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name))}


def _next_generation_number(root: Path) -> int:
    return max(_generation_dirs(root).values(), default=0) + 1


def _remove_leftovers(root: Path) -> None:
    """Called under the build lock: anything named .tmp-* is a crashed build's debris."""
    for p in root.glob(f"{TMP_PREFIX}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _remove_old_generations(root: Path, keep: set[str | None]) -> None:
    # Unlinking files another reader has mmapped is safe on Linux: its mapping stays valid.
    for name in _generation_dirs(root):
        if name not in keep:
            try:
                shutil.rmtree(root / name)
            except OSError as e:
                log.warning("could not remove old index generation %s: %s", root / name, e)


# ----------------------------------------------------------------------------------------- reading

class CatalogIndex:
    """One loaded (read-only) generation of the catalog index. Queries are thread-safe."""

    def __init__(self, gen_dir: Path, meta: dict, ann: AnnoyIndex, vectors: np.ndarray,
                 thumbs: mmap.mmap | None, *, search_k: int = -1, owners: np.ndarray | None = None,
                 features: FeatureStore | None = None, features_error: str | None = None):
        """Use :meth:`load`; this constructor takes already-validated parts."""
        self._gen_dir = gen_dir
        self._owners = owners if owners is not None else np.arange(len(vectors), dtype=np.int32)
        self._views_max = int(np.bincount(self._owners).max()) if len(self._owners) else 1
        self._features = features
        self.features_error = features_error
        self._by_item: tuple[np.ndarray, np.ndarray] | None = None
        self._ann: AnnoyIndex | None = ann
        self._vectors = vectors
        self._thumbs_map = thumbs
        # Compact in-memory copies (a 100k-item meta.json parses into ~40 MB of dicts and lists):
        # spans as one int64 array (-1 = no thumbnail), items as tuples; the parsed lists are dropped.
        self._thumb_spans = np.array([span if span is not None else (-1, 0) for span in meta["thumbs"]],
                                     dtype=np.int64).reshape(-1, 2)
        self._items = tuple(IndexedItem(d["id"], d["label"], d.get("source")) for d in meta["items"])
        self._meta = {k: v for k, v in meta.items() if k not in ("items", "thumbs")}
        self._row_of = {it.id: i for i, it in enumerate(self._items)}
        self._search_k = int(search_k)

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_bundle_sha256: str | None,
             search_k: int = -1, require_features: bool = False) -> CatalogIndex:
        """Load the live generation of the index directory ``path`` (the one ``current`` names).

        ``vectors.ann`` and ``vectors.npy`` are memory-mapped, not read. With ``expected_bundle_sha256``
        the index must have been built with that encoder bundle. ``search_k`` is Annoy's search effort
        (-1: n_trees * top_k). A missing or corrupt features.bin is an error with ``require_features``;
        otherwise the index loads without verification and ``features_error`` says why.
        Raises CatalogIndexError naming the missing/bad file or field.
        """
        root = Path(path)
        current = root / CURRENT
        try:
            target = os.readlink(current)
        except FileNotFoundError:
            raise CatalogIndexError(
                f"no catalog index at {root}: {current} does not exist; {_BUILD_HINT}") from None
        except OSError as e:
            raise CatalogIndexError(f"{current} is not a generation symlink ({e}); {_BUILD_HINT}") from None
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
        sha = meta["bundle_sha256"]
        if expected_bundle_sha256 is not None and sha != expected_bundle_sha256:
            raise CatalogIndexError(
                f"index {gen_dir} was built with bundle sha256 {sha[:12]}… but the encoder is "
                f"{expected_bundle_sha256[:12]}… (meta.json field bundle_sha256); {_REBUILD_HINT}")
        n, dim = len(meta["items"]), meta["dim"]
        m = int(meta.get("vectors", n))

        npy = gen_dir / NPY_FILE
        _require(npy)
        try:
            vectors = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CatalogIndexError(f"{npy} is unreadable ({e}); {_REBUILD_HINT}") from None
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise CatalogIndexError(f"{npy} must be a float32 N x D array, got {vectors.dtype} {vectors.shape}; "
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
        if size != meta["ann_bytes"]:
            raise CatalogIndexError(f"{ann_path} is {size} bytes but {gen_dir / META_FILE} recorded "
                                    f"{meta['ann_bytes']} (field ann_bytes): the file is corrupt; {_REBUILD_HINT}")
        ann = AnnoyIndex(max(dim, 1), METRIC)
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
        if meta.get("features"):
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
            raise CatalogIndexError(f"{gen_dir / FEATURES_FILE} is missing: the index was built without local "
                                    f"features; {_REBUILD_HINT}")
        else:
            features_error = "the index was built without local features"

        thumbs_path = gen_dir / THUMBS_FILE
        _require(thumbs_path)
        thumbs_size = thumbs_path.stat().st_size
        for item, span in zip(meta["items"], meta["thumbs"]):
            if span is not None and (len(span) != 2 or span[0] < 0 or span[1] < 0
                                     or span[0] + span[1] > thumbs_size):
                ann.unload()
                raise CatalogIndexError(f"{gen_dir / META_FILE}: thumbs entry of {item['id']!r} points "
                                        f"outside {thumbs_path} ({thumbs_size} bytes); {_REBUILD_HINT}")
        thumbs = None
        if thumbs_size:
            with open(thumbs_path, "rb") as f:
                thumbs = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return cls(gen_dir, meta, ann, vectors, thumbs, search_k=search_k, owners=owners, features=features,
                   features_error=features_error)

    # -- properties
    @property
    def dim(self) -> int:
        """Descriptor dimension (0 only for an empty catalog built without one)."""
        return int(self._meta["dim"])

    @property
    def size(self) -> int:
        """Number of items."""
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bundle_sha256(self) -> str:
        """sha256 of the encoder bundle the vectors were made with."""
        return self._meta["bundle_sha256"]

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
        return int(self._meta["n_trees"])

    @property
    def created(self) -> str:
        """ISO-8601 time the generation was written."""
        return self._meta["created"]

    @property
    def items(self) -> list[IndexedItem]:
        """id / label / source of every item, in vector order."""
        return list(self._items)

    # -- lookups
    def has(self, item_id: str) -> bool:
        """Whether ``item_id`` is in this generation."""
        return item_id in self._row_of

    def item(self, item_id: str) -> IndexedItem:
        """id / label / source of ``item_id``; CatalogIndexError when it is not in the index."""
        return self._items[self._row(item_id)]

    def thumbnail(self, item_id: str) -> bytes | None:
        """The JPEG thumbnail of ``item_id`` (None when it was enrolled without one).
        Raises CatalogIndexError when the id is not in the index."""
        return self._thumbnail_at(self._row(item_id))

    def vectors(self) -> np.ndarray:
        """The N x D float32 L2-normalised descriptors (read-only memory map of vectors.npy)."""
        return self._vectors

    def query(self, vector: np.ndarray, top_k: int) -> list[Candidate]:
        """The ``top_k`` items nearest to ``vector`` (any scale; cosine), best first.
        An empty catalog returns []."""
        if int(top_k) < 1:
            raise CatalogIndexError(f"top_k must be >= 1, got {top_k}")
        ann = self._ann
        if ann is None:
            raise CatalogIndexError(f"index {self._gen_dir} is closed")
        if not self._items:
            return []
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.size != self.dim:
            raise CatalogIndexError(f"query vector has dim {v.size} but index {self._gen_dir} has dim "
                                    f"{self.dim}; was it built with another encoder? {_REBUILD_HINT}")
        if not np.all(np.isfinite(v)):
            raise CatalogIndexError("query vector has NaN or infinite values")
        # Several vectors per item: ask for enough neighbours to still find top_k distinct items.
        n_vec = int(top_k) * self._views_max
        rows, dists = ann.get_nns_by_vector(v.tolist(), n_vec, self._search_k, include_distances=True)
        scores = angular_to_cosine(np.asarray(dists, dtype=np.float64))
        best: dict[int, float] = {}
        for r, s in zip(rows, scores):  # nearest first: the first vector seen of an item is its max
            item = int(self._owners[r])
            if item not in best:
                best[item] = float(s)
        out = [Candidate(self._items[i].id, self._items[i].label, s) for i, s in best.items()]
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

    def item_vectors(self, row: int) -> np.ndarray:
        """All vectors (views) of the item at ``row``."""
        if self._by_item is None:  # built once, on the first rebuild: rows of each item, grouped
            order = np.argsort(self._owners, kind="stable")
            self._by_item = (order, np.searchsorted(self._owners[order], np.arange(self.size + 1)))
        order, starts = self._by_item
        return np.asarray(self._vectors[order[starts[row]:starts[row + 1]]])

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
        try:
            return self._row_of[item_id]
        except KeyError:
            raise CatalogIndexError(f"id {item_id!r} is not in the catalog index {self._gen_dir}") from None

    def _thumbnail_at(self, row: int) -> bytes | None:
        off, length = (int(v) for v in self._thumb_spans[row])
        if off < 0:
            return None
        if length == 0:
            return b""
        if self._thumbs_map is None:
            raise CatalogIndexError(f"index {self._gen_dir} is closed")
        return bytes(self._thumbs_map[off:off + length])


def _require(p: Path) -> None:
    if not p.is_file():
        raise CatalogIndexError(f"index file {p} is missing; {_BUILD_HINT}")


def _read_meta(gen_dir: Path) -> dict:
    meta_path = gen_dir / META_FILE
    _require(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CatalogIndexError(f"{meta_path} is unreadable ({e}); {_REBUILD_HINT}") from None
    if not isinstance(meta, dict):
        raise CatalogIndexError(f"{meta_path} must hold a JSON object; {_REBUILD_HINT}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CatalogIndexError(f"{meta_path}: format_version {version!r} is not supported (this device "
                                f"reads {FORMAT_VERSION}); {_REBUILD_HINT}")
    for key, kind in (("dim", int), ("metric", str), ("bundle_sha256", str), ("n_trees", int),
                      ("created", str), ("ann_bytes", int), ("items", list), ("thumbs", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CatalogIndexError(f"{meta_path}: field {key} is missing or not a {kind.__name__}; "
                                    f"{_REBUILD_HINT}")
    if meta["metric"] != METRIC:
        raise CatalogIndexError(f"{meta_path}: field metric is {meta['metric']!r}; only {METRIC!r} is "
                                f"supported; {_REBUILD_HINT}")
    if len(meta["thumbs"]) != len(meta["items"]):
        raise CatalogIndexError(f"{meta_path}: field thumbs has {len(meta['thumbs'])} entries for "
                                f"{len(meta['items'])} items; {_REBUILD_HINT}")
    for n, d in enumerate(meta["items"]):
        if not (isinstance(d, dict) and isinstance(d.get("id"), str) and isinstance(d.get("label"), str)):
            raise CatalogIndexError(f"{meta_path}: items[{n}] needs string fields id and label; {_REBUILD_HINT}")
    return meta


# ------------------------------------------------------------------------------------------ sharing

class IndexHolder:
    """The index shared by the server's threads, with enrol / remove.

    ``holder.index`` is the live CatalogIndex (reading the attribute is atomic); queries go to whichever
    object was live when they started. ``add`` / ``remove`` run one at a time (a lock), rebuild a whole
    new generation from the live one's vectors + metadata + thumbnails, and then swap ``index``; the
    replaced object is not closed (a query may still be running on it) but left to garbage collection.
    They block for the rebuild; ``add_async`` / ``remove_async`` run them on one background worker and
    return a Future, while queries keep being served from the old index.
    """

    def __init__(self, path: str | os.PathLike, *, expected_bundle_sha256: str | None,
                 search_k: int = -1, n_trees: int = 50, create_empty: bool = False,
                 dim: int | None = None, require_features: bool = False):
        """Load the index at ``path``. With ``create_empty`` (and ``expected_bundle_sha256``), a directory
        without an index gets an empty one of descriptor size ``dim`` (a fresh appliance)."""
        self.path = Path(path)
        self.expected_bundle_sha256 = expected_bundle_sha256
        self.search_k = int(search_k)
        self.n_trees = int(n_trees)
        self.require_features = require_features
        self._lock = threading.Lock()  # one mutation at a time
        self._executor_lock = threading.Lock()  # not _lock: submitting must not wait for a rebuild
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if create_empty and _read_current_name(self.path) is None:
            if not expected_bundle_sha256:
                raise CatalogIndexError("creating an empty index needs expected_bundle_sha256")
            write_index(self.path, [], bundle_sha256=expected_bundle_sha256, n_trees=self.n_trees, dim=dim)
        self.index: CatalogIndex = self._load()

    def query(self, vector: np.ndarray, top_k: int) -> list[Candidate]:
        """Query the live index (see CatalogIndex.query)."""
        return self.index.query(vector, top_k)

    def add(self, items: Sequence[CatalogItem]) -> None:
        """Enrol ``items``; an id already in the index is replaced (re-enrolment: new vector, label,
        thumbnail and source). Rebuilds and swaps in a new generation; blocks until done."""
        items = list(items)
        _validate_items(items, None)  # duplicates inside the batch are an error, not "last one wins"
        if not items:
            return
        with self._lock:
            cur = self.index
            new_ids = {it.id for it in items}
            kept = self._current_items(cur, skip=new_ids)
            self._rebuild(cur, kept + items)

    def remove(self, ids: Sequence[str]) -> list[str]:
        """Remove ``ids`` from the index. Returns the ids actually removed, in the order given; ids that
        are not in the index are not an error and simply do not appear in the result (so the caller
        can report them as not found). Nothing is rebuilt when nothing is removed."""
        with self._lock:
            cur = self.index
            removed = list(dict.fromkeys(i for i in ids if cur.has(i)))
            if removed:
                self._rebuild(cur, self._current_items(cur, skip=set(removed)))
            return removed

    def add_async(self, items: Sequence[CatalogItem]) -> concurrent.futures.Future:
        """:meth:`add` on the background worker; the Future's result is None (or its exception)."""
        return self._submit(self.add, list(items))

    def remove_async(self, ids: Sequence[str]) -> concurrent.futures.Future:
        """:meth:`remove` on the background worker; the Future's result is the removed ids."""
        return self._submit(self.remove, list(ids))

    def reload(self) -> CatalogIndex:
        """Re-read ``current`` from disk (e.g. after a CLI build) and swap it in; returns it."""
        with self._lock:
            self.index = self._load()
            return self.index

    def close(self) -> None:
        """Stop the background worker (waiting for a running rebuild). The index is left to GC."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _load(self) -> CatalogIndex:
        return CatalogIndex.load(self.path, expected_bundle_sha256=self.expected_bundle_sha256,
                                 search_k=self.search_k, require_features=self.require_features)

    def _submit(self, fn: Callable, arg) -> concurrent.futures.Future:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="index-rebuild")
            return self._executor.submit(fn, arg)

    @staticmethod
    def _current_items(cur: CatalogIndex, skip: set[str]) -> list[CatalogItem]:
        return [CatalogItem(it.id, it.label, cur.item_vectors(row), cur._thumbnail_at(row), it.source,
                            cur._features.get(row) if cur._features is not None else None)
                for row, it in enumerate(cur._items) if it.id not in skip]

    def _rebuild(self, cur: CatalogIndex, items: list[CatalogItem]) -> None:
        gen_dir = write_index(self.path, items, bundle_sha256=cur.bundle_sha256, n_trees=self.n_trees,
                              dim=cur.dim or None)
        new = CatalogIndex.load_generation(gen_dir, expected_bundle_sha256=self.expected_bundle_sha256,
                                           search_k=self.search_k, require_features=self.require_features)
        self.index = new  # the old object stays usable for queries already holding it
