"""Making a generation live: a new generation is written in ``.tmp-gen-XXXX`` (edge_retrieval/index/generation.py, items
streamed in as they are made), fsynced, renamed to ``gen-N`` and only then made live by replacing the ``current``
symlink (layout: edge_retrieval/index/reader.py). A crash before that replace leaves ``current`` on the old, intact
generation; the leftovers (``.tmp-*`` folders no writer holds, an orphan ``gen-N``) are removed by the next
build. The live index of a running appliance, with enrol / remove: edge_retrieval/index/holder.py.
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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.index.generation import GenerationWriter, fsync_dir, item_vectors
from edge_retrieval.index.reader import CURRENT, TMP_PREFIX, CatalogIndex, CatalogItem, read_current_name
from edge_retrieval.model.adaptation import Projection

log = logging.getLogger(__name__)
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_WRITER_LOCK = ".lock"  # in a .tmp-gen-* folder: flock'd while its writer is alive


def write_index(
    path: str | os.PathLike,
    items: Iterable[CatalogItem],
    *,
    bundle_sha256: str,
    n_trees: int,
    dim: int | None = None,
    projection: Projection | None = None,
    store: tuple[str, int] | None = None,
) -> Path:
    """Write ``items`` (any iterable: they are written as they come) as a new generation under the index
    directory ``path`` and make it live.

    Vectors are L2-normalised on the way in. ``dim``, when given, is the encoder's descriptor size and
    every vector must have it; an empty catalog (a fresh appliance) is allowed and then records
    ``dim`` (0 when not given: fixed by the first enrolment). ``projection`` (edge_retrieval/model/adaptation.py), made for the
    same bundle, is stored with the generation and the Annoy index holds the projected vectors; vectors.npy
    keeps them as given (float16). ``store`` is (catalog store id, highest change seq) the items hold
    (edge_retrieval/catalog/store.py). Returns the new generation directory.
    Raises CatalogIndexError naming the offending id / field, or the path that could not be written.
    """
    _check_args(bundle_sha256, n_trees)
    with NewGeneration(path, dim=dim) as new:
        for item in items:
            new.add(item)
        return new.commit(bundle_sha256=bundle_sha256, n_trees=n_trees, projection=projection, store=store)


def _check_args(bundle_sha256: str, n_trees: int) -> None:
    if not isinstance(bundle_sha256, str) or not bundle_sha256:
        raise CatalogIndexError("write_index: bundle_sha256 must be the encoder bundle's sha256 (non-empty)")
    if int(n_trees) < 1:
        raise CatalogIndexError(f"write_index: n_trees must be >= 1, got {n_trees}")


class NewGeneration:
    """A generation being written under the index directory ``root``: items stream into a ``.tmp-gen-XXXX`` folder
    (``add``: each item's vectors, features and thumbnail go to disk at once), then ``commit`` completes it and
    makes it live. Until the swap in ``commit`` the live generation is untouched; leaving the ``with`` block
    without a commit (an error, a failed worker) removes the folder. The folder's ``.lock`` is flock'd for as
    long as this writer lives, so another build's clean-up (under the build lock) leaves it alone, and a writer
    that died (its lock released by the kernel) is cleaned up by the next build."""

    def __init__(self, root: str | os.PathLike, *, dim: int | None = None):
        """``dim``: the encoder's descriptor size (None: fixed by the first item)."""
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CatalogIndexError(f"cannot create the index directory {self.root}: {e}") from e
        with build_lock(self.root), self._oserror():  # no clean-up between mkdtemp and the flock
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}gen-", dir=self.root))
            os.chmod(self.tmp, 0o755)  # mkdtemp makes it 0700; the server may run as another user than the CLI
            self._lock_fd: int | None = os.open(self.tmp / _WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self.writer = GenerationWriter(self.tmp, dim=dim)
            except BaseException:
                self._abort()
                raise
        self._done = False

    @property
    def count(self) -> int:
        """Items added so far."""
        return self.writer.count

    def add(self, item: CatalogItem) -> None:
        """Write the next item (row ``count``); CatalogIndexError names a duplicate or bad id, vector, thumbnail."""
        with self._oserror():
            self.writer.add(item.id, item.label, item.vector, thumbnail_jpeg=item.thumbnail_jpeg, source=item.source,
                            features=item.features, attributes=item.attributes)

    def commit(self, *, bundle_sha256: str, n_trees: int, projection: Projection | None = None,
               store: tuple[str, int] | None = None) -> Path:
        """Complete the generation (``GenerationWriter.finish``: item table, projection, Annoy, meta, fsync), rename
        it ``gen-N`` and point ``current`` at it under the build lock. Returns the new generation directory."""
        _check_args(bundle_sha256, n_trees)
        gen_dir: Path | None = None
        try:
            with self._oserror():
                self.writer.finish(bundle_sha256=bundle_sha256, n_trees=n_trees, projection=projection, store=store)
            with build_lock(self.root):
                _remove_leftovers(self.root)
                try:
                    with self._oserror():
                        (self.tmp / _WRITER_LOCK).unlink()  # held by the build lock from here on
                        gen_dir = self.root / f"gen-{_next_generation_number(self.root):06d}"
                        os.rename(self.tmp, gen_dir)
                        previous = read_current_name(self.root)
                        _point_current(self.root, gen_dir.name)
                except BaseException:
                    # The old generation is still live; drop what this attempt wrote. (A hard crash leaves it
                    # behind instead, and the next build's _remove_leftovers takes care of it.)
                    if gen_dir is not None and gen_dir.exists() and read_current_name(self.root) != gen_dir.name:
                        shutil.rmtree(gen_dir, ignore_errors=True)
                    for leftover in self.root.glob(f"{TMP_PREFIX}current-*"):
                        with contextlib.suppress(OSError):
                            leftover.unlink()
                    raise
                _remove_old_generations(self.root, keep={gen_dir.name, previous})
        finally:
            self._abort()
        self._done = True
        return gen_dir

    @contextlib.contextmanager
    def _oserror(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise CatalogIndexError(f"could not write a new index generation in {self.root}: {e}") from e

    def _abort(self) -> None:
        """Close the files and release the folder: removed unless it was renamed into a generation."""
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> NewGeneration:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self._abort()


def validate_items(items: Sequence[CatalogItem]) -> None:
    """Check ``items`` before a rebuild: ids non-empty and unique in the batch, vectors of one dim, finite and not
    zero, thumbnails bytes; CatalogIndexError names the bad id."""
    seen: set[str] = set()
    dim = None
    for n, item in enumerate(items):
        dim = item_vectors(n, item.id, item.vector, item.thumbnail_jpeg, dim).shape[1]
        if item.id in seen:
            raise CatalogIndexError(f"duplicate catalog id {item.id!r}; ids must be unique")
        seen.add(item.id)


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


def _generation_dirs(root: Path) -> dict[str, int]:
    return {p.name: int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name))}


def _next_generation_number(root: Path) -> int:
    return max(_generation_dirs(root).values(), default=0) + 1


def _remove_leftovers(root: Path) -> None:
    """Called under the build lock: anything named .tmp-* is a crashed build's debris, unless a live writer holds
    its lock (a build streaming its items, in this process or another)."""
    for p in root.glob(f"{TMP_PREFIX}*"):
        if p.is_dir() and not p.is_symlink():
            if not _being_written(p):
                shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _being_written(tmp: Path) -> bool:
    try:
        fd = os.open(tmp / _WRITER_LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


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
