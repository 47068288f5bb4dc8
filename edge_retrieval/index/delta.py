"""The live index of a running appliance: the base generation (Annoy, immutable, edge_retrieval/index/reader.py) plus
the delta — every catalog-store change newer than the base (edge_retrieval/catalog/store.py), searched beside it.

- An enrolled item's vectors are kept here projected (the base's catalog-adapted projection) and L2-normalised,
  float32, and searched exactly (one matrix-vector product); its score is the max over its views, as in the base.
- Every id the delta names (enrolled, re-enrolled, removed, or a change that could not be indexed) hides the base's
  item of that id: a removal is a tombstone. So base + delta answers what a full rebuild with the same changes
  would (the delta's vectors are the float16 vectors a generation keeps, scored with the same cosine).
- Features and thumbnails of delta items are not held in memory: ``loader(id, seq)`` reads them back from the
  store's encoded copy (edge_retrieval/index/encoded_item.py) when a lookup verifies a candidate or the page shows it.

A ``LiveIndex`` never changes once made (queries keep the one they started with); ``with_changes`` and ``rebased``
make the next one. Vectors go to an append-only buffer shared by successive snapshots (a snapshot reads only the
rows it knows), so an enrolment costs its own rows, not a copy of the delta.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.core.photos import item_of
from edge_retrieval.core.results import Candidate
from edge_retrieval.index.generation import REBUILD_HINT, item_vectors
from edge_retrieval.index.item_table import IndexedItem
from edge_retrieval.index.reader import CatalogIndex, CatalogItem
from edge_retrieval.model.local_features import Features

Loader = Callable[[str, int], "CatalogItem | None"]


def single_threaded_blas() -> None:
    """One BLAS thread in this process. The delta's matrix-vector product is memory-bound: OpenBLAS's threads gain
    nothing on it and, on a busy 2-core device, made it ~10× slower (0.6 → 7 ms for 3,000 rows, measured); the
    encoder runs its own threads. Called once by the wiring of ``serve`` (and the benchmarks)."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1, user_api="blas")


@dataclass(frozen=True)
class DeltaEntry:
    """The latest store change of one id newer than the base: an item (its rows in the delta's vectors) or, with
    ``label`` None, a removal. ``item`` is the whole encoded item, kept in memory only when the store could not
    keep its encoding (else the loader reads features and thumbnail back on demand)."""

    id: str
    seq: int
    label: str | None
    source: str | None = None
    rows: tuple[int, int] = (0, 0)
    item: CatalogItem | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeltaChange:
    """One store row to apply: ``item`` None for a removal (or a change that could not be indexed, which hides
    the base's older version too, as a rebuild would). ``keep_item``: hold the whole item in memory (the store
    has no encoded copy of it)."""

    id: str
    seq: int
    item: CatalogItem | None
    keep_item: bool = False


class _Rows:
    """Append-only float32 rows [n, dim] with the entry ordinal of each row, shared by successive snapshots."""

    def __init__(self, dim: int, capacity: int = 256):
        self.vecs = np.empty((capacity, dim), np.float32)
        self.owner = np.empty(capacity, np.int32)
        self.ids: list[str] = []  # ordinal → id, one per appended item
        self.n = 0

    def copy(self, n: int) -> _Rows:
        """The first ``n`` rows in a buffer of their own (a snapshot that is not the newest appends here)."""
        out = _Rows(self.vecs.shape[1], max(n, 256))
        out.vecs[:n], out.owner[:n], out.ids, out.n = self.vecs[:n], self.owner[:n], list(self.ids), n
        return out

    def append(self, block: np.ndarray, item_id: str) -> tuple[int, int]:
        if self.n + len(block) > len(self.vecs):  # grow; older snapshots keep the old arrays
            cap = max(2 * len(self.vecs), self.n + len(block))
            vecs, own = np.empty((cap, self.vecs.shape[1]), np.float32), np.empty(cap, np.int32)
            vecs[:self.n], own[:self.n] = self.vecs[:self.n], self.owner[:self.n]
            self.vecs, self.owner = vecs, own
        start = self.n
        self.vecs[start:start + len(block)] = block
        self.owner[start:start + len(block)] = len(self.ids)
        self.ids.append(item_id)
        self.n += len(block)
        return start, self.n


class LiveIndex:
    """The base generation plus the delta: what queries, the page and the catalog service read. Thread-safe for
    queries; never changes once made."""

    def __init__(self, base: CatalogIndex, *, seq: int, store_id: str | None = None, loader: Loader | None = None,
                 _state: tuple | None = None):
        """An empty delta over ``base`` holding the store's changes up to ``seq`` (normally the base's own)."""
        self.base = base
        self.seq = int(seq)
        self.store_id = store_id if store_id is not None else (base.store_seq[0] if base.store_seq else None)
        self.loader = loader
        if _state is None:
            _state = ({}, None, np.zeros(0, bool), 0, 0)
        self._entries, self._rows, self._alive, self._n, self._hidden = _state
        self._live = sum(1 for e in self._entries.values() if e.label is not None)
        self._views_max = max((e.rows[1] - e.rows[0] for e in self._entries.values()), default=1)
        self._item_count: int | None = None
        self._delta_photos: dict[str, list[str]] | None = None

    # -- what the delta holds
    @property
    def delta_items(self) -> int:
        """Items enrolled or re-enrolled since the base."""
        return self._live

    @property
    def delta_removed(self) -> int:
        """Removals since the base (tombstones)."""
        return len(self._entries) - self._live

    @property
    def delta_size(self) -> int:
        """Ids the delta names (what a merge folds into the next base)."""
        return len(self._entries)

    @property
    def changes(self) -> int:
        """Catalog-store changes this index holds beyond its base (every enrolment and removal counts one)."""
        return self.seq - self._base_seq()

    def delta_entries(self) -> list[DeltaEntry]:
        """The delta's entries in change order."""
        return sorted(self._entries.values(), key=lambda e: e.seq)

    # -- the CatalogIndex interface
    @property
    def dim(self) -> int:
        """Descriptor dimension."""
        return self.base.dim

    @property
    def size(self) -> int:
        """Entries (photos): the base's not hidden plus the delta's (``item_count`` counts items)."""
        return self.base.size - self._hidden + self._live

    @property
    def bundle_sha256(self) -> str:
        """sha256 of the encoder bundle."""
        return self.base.bundle_sha256

    @property
    def generation(self) -> str:
        """The base generation's folder name (``store_seq`` tells how far the delta goes beyond it)."""
        return self.base.generation

    @property
    def path(self) -> object:
        """The base generation's folder."""
        return self.base.path

    @property
    def n_trees(self) -> int:
        """Annoy trees of the base."""
        return self.base.n_trees

    @property
    def projection(self):
        """The base's catalog-adapted projection (the delta's vectors are projected with it)."""
        return self.base.projection

    @property
    def has_features(self) -> bool:
        """Whether spatial verification is possible: the base's features decide, unless the base is empty (a new
        appliance's catalog, all of it enrolled into the delta: each item carries its own features)."""
        return self.base.has_features or (self.base.size == 0 and bool(self._entries))

    @property
    def features_error(self) -> str | None:
        """Why the index has no features, if it has none."""
        return None if self.has_features else self.base.features_error

    @property
    def store_seq(self) -> tuple[str, int] | None:
        """(catalog store id, the highest store change this index holds, base and delta together)."""
        if self.store_id is None:
            return self.base.store_seq
        return (self.store_id, self.seq)

    @property
    def items(self) -> list[IndexedItem]:
        """id / label / source of every item: the base's (not hidden), then the delta's."""
        out = [it for it in self.base.items if it.id not in self._entries] if self._entries else self.base.items
        return out + [IndexedItem(e.id, e.label, e.source, e.attributes) for e in self.delta_entries()
                      if e.label is not None]

    def photos(self, item_id: str) -> list[str]:
        """The entry keys of every photo of item ``item_id``: the base's not hidden, then the delta's."""
        if self._delta_photos is None:
            by_item: dict[str, list[str]] = {}
            for e in self.delta_entries():
                by_item.setdefault(item_of(e.id), []).append(e.id)
            self._delta_photos = by_item
        keys = [k for k in self.base.photos(item_id) if k not in self._entries]
        return keys + [k for k in self._delta_photos.get(item_id, []) if self._entries[k].label is not None]

    @property
    def item_count(self) -> int:
        """How many items (not photos) the catalog holds: the base's, less those whose every photo the delta
        removed, plus those the delta brought (worked out once per snapshot, on first use)."""
        if self._item_count is None:
            touched = {item_of(k) for k in self._entries}
            self._item_count = (self.base.item_count - sum(1 for t in touched if self.base.photos(t))
                                + sum(1 for t in touched if self.photos(t)))
        return self._item_count

    def has(self, item_id: str) -> bool:
        """Whether ``item_id`` is in the catalog."""
        e = self._entries.get(item_id)
        return e.label is not None if e is not None else self.base.has(item_id)

    def item(self, item_id: str) -> IndexedItem:
        """id / label / source of ``item_id``; CatalogIndexError when it is not in the catalog."""
        e = self._entries.get(item_id)
        if e is None:
            return self.base.item(item_id)
        if e.label is None:
            raise CatalogIndexError(f"id {item_id!r} is not in the catalog index (removed)")
        return IndexedItem(e.id, e.label, e.source, e.attributes)

    def thumbnail(self, item_id: str) -> bytes | None:
        """The JPEG thumbnail of ``item_id``; CatalogIndexError when it is not in the catalog."""
        if item_id not in self._entries:
            return self.base.thumbnail(item_id)
        full = self._full(self._entry(item_id))
        return None if full is None else full.thumbnail_jpeg

    def features(self, item_id: str) -> Features | None:
        """Local features of ``item_id`` (None: none, or verification is off for this index)."""
        if item_id not in self._entries:
            return self.base.features(item_id)
        if not self.base.has_features and self.base.size:
            return None
        full = self._full(self._entry(item_id))
        f = None if full is None else full.features
        return f if f is not None and len(f) else None

    def vectors(self) -> np.ndarray:
        """The base's stored vectors (vectors.npy)."""
        return self.base.vectors()

    def current(self) -> LiveIndex:
        """This index (a snapshot never changes)."""
        return self

    def close(self) -> None:
        """Nothing to release here: the base is left to garbage collection (queries may still hold it)."""

    def __repr__(self) -> str:
        return f"LiveIndex({self.base.generation}, base={self.base.size}, delta={self.delta_size}, seq={self.seq})"

    def query(self, vector: np.ndarray, top_k: int) -> list[Candidate]:
        """The ``top_k`` nearest items of base and delta together (cosine), best first."""
        if int(top_k) < 1:
            raise CatalogIndexError(f"top_k must be >= 1, got {top_k}")
        base = self._base_query(vector, int(top_k))
        if not self._live:
            return base
        found = base + self._search(self.project(vector), int(top_k))
        found.sort(key=lambda c: -c.score)
        return found[:int(top_k)]

    def project(self, vector: np.ndarray) -> np.ndarray:
        """A bundle descriptor [D] or [V, D] as the delta and the base's Annoy trees hold it: projected (when the
        base is catalog-adapted) and L2-normalised, float32."""
        v = np.asarray(vector, np.float32)
        if self.dim and v.shape[-1] != self.dim:
            raise CatalogIndexError(f"query vector has dim {v.shape[-1]} but the index has dim {self.dim}; "
                                    f"was it built with another encoder? {REBUILD_HINT}")
        if not np.all(np.isfinite(v)):
            raise CatalogIndexError("query vector has NaN or infinite values")
        if self.base.projection is not None:
            return self.base.projection.apply(v)
        return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)

    def _base_query(self, vector: np.ndarray, top_k: int) -> list[Candidate]:
        if not self._hidden:
            return self.base.query(vector, top_k)
        k = top_k
        while True:  # hidden base items may take places: ask for more until top_k remain or the base runs out
            found = self.base.query(vector, k)
            kept = [c for c in found if c.key not in self._entries]
            if len(kept) >= top_k or len(found) < k or k >= self.base.size:
                return kept[:top_k]
            k = min(4 * k, self.base.size)

    def _search(self, q: np.ndarray, top_k: int) -> list[Candidate]:
        """Exact search over the live delta rows: an item's score is the max over its views."""
        rows = self._rows
        scores = rows.vecs[:self._n] @ q.reshape(-1)
        scores[~self._alive] = -np.inf
        k = min(int(self._alive.sum()), top_k * self._views_max)
        top = np.argpartition(-scores, k - 1)[:k] if k < self._n else np.arange(self._n)
        top = top[np.argsort(-scores[top], kind="stable")]
        out: list[Candidate] = []
        seen: set[int] = set()
        for r in top:
            o = int(rows.owner[r])
            if o in seen or not np.isfinite(scores[r]):
                continue
            seen.add(o)
            e = self._entries[rows.ids[o]]
            out.append(Candidate.of_entry(e.id, e.label or "", float(np.clip(scores[r], -1.0, 1.0)), e.attributes))
            if len(out) == top_k:
                break
        return out

    def _entry(self, item_id: str) -> DeltaEntry:
        e = self._entries.get(item_id)
        if e is None or e.label is None:
            raise CatalogIndexError(f"id {item_id!r} is not in the catalog index")
        return e

    def _full(self, e: DeltaEntry) -> CatalogItem | None:
        if e.item is not None:
            return e.item
        return self.loader(e.id, e.seq) if self.loader is not None else None

    # -- the next snapshot
    def with_changes(self, changes: Sequence[DeltaChange], seq: int) -> LiveIndex:
        """This index plus ``changes`` (store rows in change order), holding the store up to ``seq``. A change not
        newer than what this index holds for its id is ignored (the base or the delta has it already).
        CatalogIndexError for an item whose vectors are bad (nothing changes then)."""
        base_seq = self._base_seq()
        entries = dict(self._entries)
        todo = [c for c in changes if c.seq > base_seq and (c.id not in entries or entries[c.id].seq < c.seq)]
        blocks = [self._rows_of(c.item) if c.item is not None else None for c in todo]  # checked before any change
        rows = self._rows
        if rows is not None and rows.n != self._n:
            rows = rows.copy(self._n)
        if rows is None and any(b is not None for b in blocks):
            rows = _Rows(next(b for b in blocks if b is not None).shape[1])
        alive = np.zeros(self._n + sum(len(b) for b in blocks if b is not None), bool)
        alive[:self._n] = self._alive
        hidden = self._hidden
        for c, block in zip(todo, blocks):
            old = entries.get(c.id)
            if old is not None:
                alive[old.rows[0]:old.rows[1]] = False
            elif self.base.has(c.id):
                hidden += 1
            if block is None:
                entries[c.id] = DeltaEntry(c.id, c.seq, None)
                continue
            start, end = rows.append(block, c.id)
            alive[start:end] = True
            entries[c.id] = DeltaEntry(c.id, c.seq, c.item.label, c.item.source, (start, end),
                                       c.item if c.keep_item else None, c.item.attributes)
        n = rows.n if rows is not None else 0
        return LiveIndex(self.base, seq=max(self.seq, int(seq)), store_id=self.store_id, loader=self.loader,
                         _state=(entries, rows, alive, n, hidden))

    def rebased(self, base: CatalogIndex) -> LiveIndex:
        """The same catalog over a new base (a merge, or a generation another process made live): only the entries
        newer than the new base stay in the delta, their vectors projected with the new base's projection."""
        fresh = LiveIndex(base, seq=0, store_id=self.store_id, loader=self.loader)
        fresh.seq = fresh._base_seq()
        keep = [e for e in self.delta_entries() if e.seq > fresh.seq]
        changes, lost = [], []
        for e in keep:
            item = self._full(e) if e.label is not None else None
            if e.label is not None and item is None:  # its encoding could not be read back: the next replay
                lost.append(e.seq)                    # of the store (from before its change) brings it back
                continue
            changes.append(DeltaChange(e.id, e.seq, item, keep_item=e.item is not None))
        seq = max(self.seq, fresh.seq)
        if lost:
            seq = max(fresh.seq, min(lost) - 1)
            changes = [c for c in changes if c.seq <= seq]
        return fresh.with_changes(changes, seq)

    def _base_seq(self) -> int:
        mark = self.base.store_seq
        return mark[1] if mark is not None and (self.store_id is None or mark[0] == self.store_id) else 0

    def _rows_of(self, item: CatalogItem) -> np.ndarray:
        raw = item_vectors(0, item.id, item.vector, item.thumbnail_jpeg, self.dim or None)
        return self.project(raw.astype(np.float32)).reshape(len(raw), -1)

    def stored_items(self, skip: set[str] | frozenset[str] = frozenset()) -> Iterator[CatalogItem]:
        """Every item as stored, base then delta (what a merge writes), except ``skip``; CatalogIndexError when a
        delta item's encoding cannot be read back."""
        yield from self.base.stored_items(skip=set(skip) | set(self._entries))
        for e in self.delta_entries():
            if e.label is not None and e.id not in skip:
                item = self._full(e)
                if item is None:
                    raise CatalogIndexError(f"delta item {e.id!r}: its encoding cannot be read back")
                yield item
