"""Writing the catalog index: a new generation is built in ``.tmp-gen-XXXX``, fsynced, renamed to ``gen-N``
and only then made live by replacing the ``current`` symlink (layout: device/index.py). A crash before that
replace leaves ``current`` on the old, intact generation; the leftovers (``.tmp-*`` folders, an orphan
``gen-N``) are removed by the next build. ``IndexHolder`` is the live index of a running appliance, with
enrol / remove rebuilding a generation in the background while queries go on.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from .adapt import PROJECTION_FILE, Projection
from .config import IndexConfig
from .errors import CatalogIndexError
from .index import (ANN_FILE, CURRENT, FEATURES_FILE, FORMAT_VERSION, ITEMS_FILE, META_FILE, METRIC, NPY_FILE,
                    OWNERS_FILE, THUMBS_FILE, TMP_PREFIX, CatalogIndex, CatalogItem, IndexMeta, read_current_name)
from .items import ItemTable
from .verify import Features, FeatureStore

log = logging.getLogger(__name__)
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_CHUNK = 65536  # vectors projected at a time


def write_index(
    path: str | os.PathLike,
    items: Sequence[CatalogItem],
    *,
    bundle_sha256: str,
    n_trees: int,
    dim: int | None = None,
    projection: Projection | None = None,
    store: tuple[str, int] | None = None,
) -> Path:
    """Write ``items`` as a new generation under the index directory ``path`` and make it live.

    Vectors are L2-normalised on the way in. ``dim``, when given, is the encoder's descriptor size and
    every vector must have it; an empty catalog (a fresh appliance) is allowed and then records
    ``dim`` (0 when not given: fixed by the first enrolment). ``projection`` (device/adapt.py), made for the
    same bundle, is stored with the generation and the Annoy index holds the projected vectors; vectors.npy
    keeps them as given (float16). ``store`` is (catalog store id, highest change seq) the items hold
    (device/store.py). Returns the new generation directory.
    Raises CatalogIndexError naming the offending id / field, or the path that could not be written.
    """
    root = Path(path)
    vectors, owners, dim = validate_items(items, dim)
    if not isinstance(bundle_sha256, str) or not bundle_sha256:
        raise CatalogIndexError("write_index: bundle_sha256 must be the encoder bundle's sha256 (non-empty)")
    if int(n_trees) < 1:
        raise CatalogIndexError(f"write_index: n_trees must be >= 1, got {n_trees}")
    if projection is not None and (projection.bundle_sha256 != bundle_sha256 or projection.in_dim != dim):
        raise CatalogIndexError(f"write_index: the projection was fitted for bundle {projection.bundle_sha256[:12]}… "
                                f"({projection.in_dim}-d), not {bundle_sha256[:12]}… ({dim}-d); rebuild the index")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CatalogIndexError(f"cannot create the index directory {root}: {e}") from e

    with build_lock(root):
        _remove_leftovers(root)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}gen-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the server may run as another user than the CLI
        gen_dir: Path | None = None
        try:
            _write_generation(tmp, items, vectors, owners, dim=dim, bundle_sha256=bundle_sha256,
                              n_trees=int(n_trees), projection=projection, store=store)
            gen_dir = root / f"gen-{_next_generation_number(root):06d}"
            os.rename(tmp, gen_dir)
            previous = read_current_name(root)
            _point_current(root, gen_dir.name)
        except BaseException as e:
            # The old generation is still live; drop what this attempt wrote. (A hard crash leaves it
            # behind instead, and the next build's _remove_leftovers takes care of it.)
            if gen_dir is None or not gen_dir.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            elif read_current_name(root) != gen_dir.name:
                shutil.rmtree(gen_dir, ignore_errors=True)
            for leftover in root.glob(f"{TMP_PREFIX}current-*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if isinstance(e, OSError):
                raise CatalogIndexError(f"could not write a new index generation in {root}: {e}") from e
            raise
        _remove_old_generations(root, keep={gen_dir.name, previous})
    return gen_dir


def validate_items(items: Sequence[CatalogItem], dim: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(vectors L2-normalised as float16 — what vectors.npy keeps, so a fresh build and a rebuild search the same
    vectors —, owner row of each vector, dim) of ``items``; CatalogIndexError names the bad id."""
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
        rows.append((v / norm).astype(np.float16))
        owners.extend([n] * len(v))
    dim = int(dim or 0)
    vectors = np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float16)
    return vectors, np.asarray(owners, dtype=np.int32), dim


def _write_generation(gen: Path, items: Sequence[CatalogItem], vectors: np.ndarray, owners: np.ndarray, *,
                      dim: int, bundle_sha256: str, n_trees: int, projection: Projection | None,
                      store: tuple[str, int] | None) -> None:
    # The raw vectors only serve enrol/remove rebuilds (never a query): float16 halves them on disk.
    for name, array in ((NPY_FILE, vectors), (OWNERS_FILE, owners)):
        with open(gen / name, "wb") as f:
            np.save(f, array, allow_pickle=False)
            _fsync_file(f)
    # Features are all-or-nothing: an item without them gets an empty entry (never verified).
    with_features = any(it.features is not None for it in items)
    if with_features:
        FeatureStore.write(gen / FEATURES_FILE, [it.features if it.features is not None
                                                 else Features.empty() for it in items])

    thumbs: list[tuple[int, int] | None] = []
    with open(gen / THUMBS_FILE, "wb") as f:
        offset = 0
        for item in items:
            if item.thumbnail_jpeg is None:
                thumbs.append(None)
                continue
            data = bytes(item.thumbnail_jpeg)
            f.write(data)
            thumbs.append((offset, len(data)))
            offset += len(data)
        _fsync_file(f)
    ItemTable.build([it.id for it in items], [it.label for it in items], [it.source for it in items],
                    thumbs).write(gen / ITEMS_FILE)

    if projection is not None:
        projection.save(gen / PROJECTION_FILE)
    ann = AnnoyIndex(max(projection.dim if projection is not None else dim, 1), METRIC)
    ann.set_seed(0)  # same catalog, same trees: builds are reproducible
    for start in range(0, len(vectors), _CHUNK):  # in chunks: a 1M-item catalog's float32 copy would be GBs
        chunk = np.asarray(vectors[start:start + _CHUNK], np.float32)
        for i, v in enumerate(projection.apply(chunk) if projection is not None else chunk, start):
            ann.add_item(i, v)
    ann.build(n_trees)
    ann.save(str(gen / ANN_FILE))
    ann.unload()
    with open(gen / ANN_FILE, "rb") as f:
        os.fsync(f.fileno())

    meta = IndexMeta(
        format_version=FORMAT_VERSION, dim=dim, metric=METRIC, bundle_sha256=bundle_sha256, n_trees=n_trees,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        ann_bytes=(gen / ANN_FILE).stat().st_size, vectors=int(len(vectors)), features=with_features,
        projection=None if projection is None else {"dim": projection.dim, "fit_items": projection.fit_items,
                                                    "views_per_item": projection.views_per_item},
        count=len(items), store=store)
    with open(gen / META_FILE, "w", encoding="utf-8") as f:
        f.write(meta.model_dump_json(indent=1))
        _fsync_file(f)
    fsync_dir(gen)


_held = threading.local()  # the index folders whose build lock this thread holds (so it nests)


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """The index folder's build lock: flock on ``.lock``, not only a threading lock — the CLI and the server
    may build the same folder. Whoever writes a generation holds it from reading ``current`` (and the catalog
    store) to swapping ``current``, so nobody overwrites a generation they did not read. Re-entrant per thread."""
    key = str(Path(root).resolve())
    held = getattr(_held, "roots", None) or set()
    _held.roots = held
    if key in held:
        yield
        return
    fd = os.open(Path(root) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        yield
    finally:
        held.discard(key)
        os.close(fd)


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
    # Unlinking files another reader has mmapped is safe on Linux: its mapping stays valid. Damaged generations
    # were renamed aside (recover_index) and are never removed here.
    for name in _generation_dirs(root):
        if name not in keep:
            try:
                shutil.rmtree(root / name)
                log.info("index %s: old generation %s removed (kept: %s)", root, name, ", ".join(sorted(filter(None, keep))))
            except OSError as e:
                log.warning("could not remove old index generation %s: %s", root / name, e)


def recover_index(root: str | os.PathLike) -> list[dict]:
    """Make ``current`` name a generation that loads, without deleting anything: a ``current`` that is not a
    link to a generation (a regular file, a dangling link) and every generation that fails to load (corrupt
    meta.json, vectors.ann, thumbs.bin, owners.npy, projection.npz …) are renamed ``<name>.damaged-<time>`` and
    logged, and ``current`` is pointed at the newest generation that loads (none: the caller builds one).
    Another bundle is not damage (the caller refuses or rebuilds that). Returns what was set aside."""
    root = Path(root)
    if not root.is_dir():
        return []
    aside: list[dict] = []
    with build_lock(root):
        link, name = root / CURRENT, read_current_name(root)
        if (link.exists() or link.is_symlink()) and (name is None or not (root / name).is_dir()):
            aside.append(_set_aside(link, "'current' is not a link to a generation folder"))
            name = None
        if name is not None:
            why = _damage(root / name)
            if why is None:
                return aside
            aside.append(_set_aside(root / name, why))
        for gen in sorted(_generation_dirs(root), key=_generation_dirs(root).get, reverse=True):
            why = _damage(root / gen)
            if why is None:
                if name is not None or aside:
                    _point_current(root, gen)
                    log.warning("index %s: 'current' now names %s, the newest generation that loads", root, gen)
                return aside
            aside.append(_set_aside(root / gen, why))
        if (link.exists() or link.is_symlink()):
            link.unlink()
    return aside


def _damage(gen: Path) -> str | None:
    try:
        CatalogIndex.load_generation(gen, expected_bundle_sha256=None).close()
        return None
    except CatalogIndexError as e:
        return str(e)


def _set_aside(path: Path, why: str) -> dict:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.rename(path, dest)
    fsync_dir(path.parent)
    log.error("index: %s set aside as %s: %s", path, dest.name, why)
    return {"name": path.name, "set_aside_as": dest.name, "why": why, "time": stamp}


def _point_current(root: Path, gen: str) -> None:
    link_tmp = root / f"{TMP_PREFIX}current-{os.getpid()}-{threading.get_ident()}"
    with contextlib.suppress(FileNotFoundError):
        link_tmp.unlink()
    os.symlink(gen, link_tmp)
    os.replace(link_tmp, root / CURRENT)
    fsync_dir(root)


class IndexHolder:
    """The index shared by the server's threads, with enrol / remove.

    ``holder.current()`` is the live CatalogIndex; queries go to whichever object was live when they
    started. ``add`` / ``remove`` run one at a time (a lock), rebuild a whole
    new generation from the live one's vectors + metadata + thumbnails, and then swap the live one; the
    replaced object is not closed (a query may still be running on it) but left to garbage collection.
    They block for the rebuild while queries keep being served from the old index; ``rebuild_with`` decides
    the new items under the build lock (the catalog service replays its store that way).
    """

    def __init__(self, config: IndexConfig, *, expected_bundle_sha256: str | None, create_empty: bool = False,
                 dim: int | None = None, require_features: bool = False, recover: bool = False):
        """Load the index at ``config.path``. With ``create_empty`` (and ``expected_bundle_sha256``), a
        directory without an index gets an empty one of descriptor size ``dim`` (a fresh appliance). With
        ``recover``, damaged generations are set aside first (``recover_index``; listed in ``set_aside``)."""
        self.config = config
        self.path = Path(config.path)
        self.set_aside: list[dict] = recover_index(self.path) if recover else []
        self.expected_bundle_sha256 = expected_bundle_sha256
        self.require_features = require_features
        self._lock = threading.Lock()  # one mutation at a time
        if create_empty and read_current_name(self.path) is None:
            if not expected_bundle_sha256:
                raise CatalogIndexError("creating an empty index needs expected_bundle_sha256")
            write_index(self.path, [], bundle_sha256=expected_bundle_sha256, n_trees=config.n_trees, dim=dim)
        self._index: CatalogIndex = self._load()
        self._refused: str | None = None  # a generation on disk that refresh() could not load

    def current(self) -> CatalogIndex:
        """The live generation (swapped atomically on enrol/remove; a query keeps the one it got)."""
        return self._index

    def add(self, items: Sequence[CatalogItem]) -> None:
        """Enrol ``items``; an id already in the index is replaced (re-enrolment: new vector, label,
        thumbnail and source). Rebuilds and swaps in a new generation; blocks until done."""
        self.update(add=items)

    def remove(self, ids: Sequence[str]) -> list[str]:
        """Remove ``ids`` from the index. Returns the ids actually removed, in the order given; ids that
        are not in the index are not an error and simply do not appear in the result (so the caller
        can report them as not found). Nothing is rebuilt when nothing is removed."""
        return self.update(remove=ids)

    def update(self, *, add: Sequence[CatalogItem] = (), remove: Sequence[str] = ()) -> list[str]:
        """Enrol ``add`` and remove ``remove`` in one rebuild (nothing is rebuilt when nothing changes);
        returns the ids actually removed."""
        items = list(add)
        validate_items(items, None)  # duplicates inside the batch are an error, not "last one wins"
        with self._lock:
            cur = self._live_on_disk()
            removed = list(dict.fromkeys(i for i in remove if cur.has(i)))
            if items or removed:
                kept = cur.stored_items(skip={it.id for it in items} | set(removed))
                self._rebuild(cur, kept + items, store=cur.store_seq)
            return removed

    def rebuild_with(self, change: Callable[[CatalogIndex], tuple[list[CatalogItem], tuple[str, int]] | None]) -> bool:
        """One rebuild decided under the build lock: ``change(live)`` is called with the generation ``current``
        names on disk at that moment (another process's build included) and returns the new generation's items
        and its store (id, seq), or None for no change. True when a generation was written."""
        with self._lock, build_lock(self.path):
            cur = self._live_on_disk()
            planned = change(cur)
            if planned is None:
                return False
            self._rebuild(cur, planned[0], store=planned[1])
            return True

    def refresh(self) -> bool:
        """Swap in the generation ``current`` names on disk when another process replaced it (a CLI ``index
        build``, a generation shipped to a fleet device); True when it did. One readlink when nothing changed; a
        generation that cannot be loaded (another bundle, corrupt) is logged once and the live one kept."""
        on_disk = read_current_name(self.path)
        if on_disk in (None, self._index.generation, self._refused):
            return False
        if not self._lock.acquire(blocking=False):  # a rebuild is running: it starts from the disk itself
            return False
        try:
            self._live_on_disk()
        except CatalogIndexError as e:
            self._refused = on_disk
            log.error("index %s: not switching to %s: %s", self.path, on_disk, e)
            return False
        finally:
            self._lock.release()
        return True

    def close(self) -> None:
        """Nothing runs in the background here (callers rebuild on their own threads): kept so that every
        owner of an index can release it the same way. The index itself is left to garbage collection."""

    def _load(self) -> CatalogIndex:
        return CatalogIndex.load(self.path, expected_bundle_sha256=self.expected_bundle_sha256,
                                 search_k=self.config.search_k, require_features=self.require_features)

    def _live_on_disk(self) -> CatalogIndex:
        """Called under ``_lock`` before a rebuild: if ``current`` on disk names another generation than the
        loaded one (an ``index build`` or ``catalog add`` from the CLI meanwhile), load that one first, so
        the rebuild starts from it instead of silently throwing it away."""
        on_disk = read_current_name(self.path)
        if on_disk is not None and on_disk != self._index.generation:
            log.warning("index %s: 'current' is now %s, not the loaded %s (changed by another process): "
                        "reloading it before this change", self.path, on_disk, self._index.generation)
            self._index = self._load()
        return self._index

    def _rebuild(self, cur: CatalogIndex, items: list[CatalogItem], store: tuple[str, int] | None) -> None:
        # The live generation's projection is carried over (only a full `index build` refits it).
        gen_dir = write_index(self.path, items, bundle_sha256=cur.bundle_sha256, n_trees=self.config.n_trees,
                              dim=cur.dim or None, projection=cur.projection, store=store)
        new = CatalogIndex.load_generation(gen_dir, expected_bundle_sha256=self.expected_bundle_sha256,
                                           search_k=self.config.search_k, require_features=self.require_features)
        self._index = new  # the old object stays usable for queries already holding it
