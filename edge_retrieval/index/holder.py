"""The live index of a running appliance: ``IndexHolder`` shares the live index — the base generation plus the delta
of newer catalog changes (edge_retrieval/index/delta.py) — among the server's threads. ``apply_delta`` makes changes
searchable at once (no generation is written); ``rebuild_with`` writes a new base (a merge, or a whole rebuild,
edge_retrieval/index/writer.py) and keeps the delta's newer entries over it; ``refresh`` follows another process's
new base (a CLI ``index build``). Queries go on throughout, each on the snapshot it started with.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from edge_retrieval.core.config import IndexConfig
from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.index.delta import DeltaChange, LiveIndex, Loader
from edge_retrieval.index.reader import CatalogIndex, CatalogItem, read_current_name
from edge_retrieval.index.writer import build_lock, recover_index, validate_items, write_index

log = logging.getLogger(__name__)


class IndexHolder:
    """The index shared by the server's threads.

    ``holder.current()`` is the live ``LiveIndex`` (base + delta); queries go to whichever snapshot was live when
    they started. ``apply_delta`` adds store changes to the delta at once. ``add`` / ``remove`` (and the catalog
    service's merges through ``rebuild_with``, which decides the new items under the build lock) run one at a time,
    write a whole new base generation, and then swap it in; replaced objects are not closed (a query may still
    be running on them) but left to garbage collection. Writing a base never blocks ``apply_delta``.
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
        self._lock = threading.Lock()  # one new generation at a time
        self._delta_lock = threading.RLock()  # one new snapshot at a time (never held while a generation is written)
        if create_empty and read_current_name(self.path) is None:
            if not expected_bundle_sha256:
                raise CatalogIndexError("creating an empty index needs expected_bundle_sha256")
            write_index(self.path, [], bundle_sha256=expected_bundle_sha256, n_trees=config.n_trees, dim=dim)
        self._index: CatalogIndex = self._load()
        self._view = LiveIndex(self._index, seq=self._base_seq(self._index))
        self._refused: str | None = None  # a generation on disk that refresh() could not load

    def current(self) -> LiveIndex:
        """The live index, base + delta (swapped atomically on every change; a query keeps the one it got)."""
        return self._view

    def base(self) -> CatalogIndex:
        """The live base generation."""
        return self._index

    def attach(self, store_id: str, loader: Loader) -> None:
        """Say which catalog store the delta's changes come from and how a delta item's features and thumbnail
        are read back (``loader(id, seq)``); the delta starts empty, at what the base holds of that store."""
        with self._delta_lock:
            view = LiveIndex(self._index, seq=0, store_id=store_id, loader=loader)
            view.seq = view._base_seq()
            self._view = view

    def apply_delta(self, changes: list[DeltaChange], seq: int) -> LiveIndex:
        """Make store ``changes`` searchable (no generation written) and record that the live index holds the store
        up to ``seq``; returns the new snapshot. CatalogIndexError for bad vectors (nothing changes then)."""
        with self._delta_lock:
            self._view = self._view.with_changes(changes, seq)
            return self._view

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
        validate_items(items)  # duplicates inside the batch are an error, not "last one wins"
        removed: list[str] = []

        def plan(_cur: CatalogIndex):
            view = self._view  # the live generation (as rebuild_with just loaded it) + its delta: folded in too
            removed.extend(dict.fromkeys(i for i in remove if view.has(i)))
            if not items and not removed:
                return None
            kept = view.stored_items(skip={it.id for it in items} | set(removed))
            return itertools.chain(kept, items), view.store_seq

        self.rebuild_with(plan)
        return removed

    def rebuild_with(self, change: Callable[[CatalogIndex], tuple[Iterable[CatalogItem], tuple[str, int] | None]
                                            | None]) -> bool:
        """One rebuild decided under the build lock: ``change(live)`` is called with the generation ``current``
        names on disk at that moment (another process's build included) and returns the new generation's items
        and its store (id, seq; None: made without a store), or None for no change. True when a generation was
        written. Every rebuild of a live index goes through here (merges and ``update``)."""
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
            self._set_base(self._load())
        return self._index

    def _rebuild(self, cur: CatalogIndex, items: Iterable[CatalogItem], store: tuple[str, int] | None) -> None:
        # The live generation's projection is carried over (only a full `index build` refits it).
        gen_dir = write_index(self.path, items, bundle_sha256=cur.bundle_sha256, n_trees=self.config.n_trees,
                              dim=cur.dim or None, projection=cur.projection, store=store)
        new = CatalogIndex.load_generation(gen_dir, expected_bundle_sha256=self.expected_bundle_sha256,
                                           search_k=self.config.search_k, require_features=self.require_features)
        self._set_base(new)  # the old objects stay usable for queries already holding them

    def _set_base(self, base: CatalogIndex) -> None:
        """Swap in a new base; the delta keeps only what is newer than it (what arrived during a merge)."""
        with self._delta_lock:
            self._index = base
            self._view = self._view.rebased(base)

    @staticmethod
    def _base_seq(idx: CatalogIndex) -> int:
        return idx.store_seq[1] if idx.store_seq is not None else 0
