"""The catalog service: enrol, remove and keep the live index in step with the catalog store — the one path that
HTTP (edge_retrieval/app/appliance.py → edge_retrieval/web/) and the CLI (``catalog add|remove``, ``index build``) both take.

- An enrolment is validated and encoded first, then committed to the store (edge_retrieval/catalog/store.py) with its
  encoded copy in the same transaction, and only then acknowledged; a removal is a committed tombstone.
- ``apply`` puts every store change newer than the live index into its delta (edge_retrieval/index/delta.py): searchable
  at once, no generation written — an enrolment writes its original and its encoding, not the catalog. After a
  restart the delta comes back from the store (the encoded copies; an original is re-encoded only when its copy is
  missing or damaged).
- A merge writes a new base generation: under the index build lock it replays every store change newer than the
  generation ``current`` names *at that moment* (whoever made it: a merge, the CLI, a shipped generation) and records
  the store seq it reached; the delta then keeps only what came after. It runs in the background when the delta
  names ``index.merge_after_items`` ids, queries and enrolments going on; at once (in ``apply``) when the base was not
  made from this store (a folder build, a shipped generation). So no order of merges, crashes and restarts can revert
  a re-enrolment or bring back a removed item, and a CLI build is built upon, never overwritten.
- One worker applies changes (woken by each change, and every ``WATCH_S`` for another process's changes), another
  merges; a failed merge (a full disk) is retried every ``catalog.retry_s`` while base + delta keep serving.
- Free space is checked before anything is acknowledged (DiskFullError → 507).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from edge_retrieval.catalog.build import ItemMaker
from edge_retrieval.catalog.changes import CatalogChanges
from edge_retrieval.catalog.migration import migrate_enrolled_dir
from edge_retrieval.catalog.store import CatalogStore, StoredItem, ensure_free
from edge_retrieval.core.config import CatalogConfig, ImagesConfig
from edge_retrieval.core.errors import ApplianceError, CatalogIndexError, InputError, StoreError
from edge_retrieval.core.status import CatalogHealth, IndexHealth
from edge_retrieval.imaging.codec import decode_image
from edge_retrieval.index.delta import DeltaChange
from edge_retrieval.index.encoded_item import decode_item, encode_item
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.reader import CatalogIndex, CatalogItem
from edge_retrieval.index.store_mark import newest_claim, read_store_mark, write_store_mark

log = logging.getLogger(__name__)
WATCH_S = 1.0  # how often the worker looks for another process's changes (a CLI enrolment, a new generation)
APPLY_BATCH = 256  # store changes encoded or read back at a time when the delta is rebuilt from the store
UNSTAMPED = "delta_over_generation"  # store meta: a base not made from this store that the delta goes over as it is


@dataclass
class ApplyReport:
    """What one replay changed: ids (re-)enrolled, removals applied, rows that could not be indexed."""

    enrolled: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seq: int = 0


class CatalogService(CatalogChanges):
    """The catalog store + the live index + the item maker, and the workers that keep them in step."""

    def __init__(self, config: CatalogConfig, holder: IndexHolder, maker: ItemMaker, *,
                 images: ImagesConfig = ImagesConfig(), set_aside: list[dict] | None = None):
        """Open (or create) ``config.store``; its first start migrates ``config.enrolled_dir`` (originals,
        labels.json, removed.json of older versions; damaged ones are skipped and logged)."""
        self.config = config
        self.holder = holder
        self.maker = maker
        self.images = images
        self.store = CatalogStore(config.store, derived_from=newest_claim(
            holder.current().store_seq, read_store_mark(holder.config.path)))
        self._marked: tuple[str, int] | None = None
        self.migrated = migrate_enrolled_dir(self.store, config.enrolled_dir)
        self.set_aside = list(set_aside or []) + holder.set_aside
        self.first: ApplyReport | None = None
        self.last_error: str | None = None
        self.merge_error: str | None = None
        self.last_merge: dict | None = None
        self.merging = False
        self.damaged_copies: list[dict] = []  # the last encoded copies found damaged (their originals were used)
        self._cache: dict[str, tuple[int, CatalogItem]] = {}  # acknowledged, encoded, not yet in the index
        self._cond = threading.Condition()
        self._claim = threading.Lock()  # changes.py: an id's checks and its write at once
        self._apply_lock = threading.Lock()
        self._merge_lock = threading.Lock()
        self._wake = threading.Event()
        self._merge_due = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rebuild_s = 1.0
        self._gen_bytes: tuple[str, int] = ("", 0)
        holder.attach(self.store.id, self._stored_item)

    # ---- running -------------------------------------------------------------------------------------
    def start(self) -> CatalogService:
        """Bring the index up to date with the store (as a start must: the delta comes back from the store), then
        run the workers. A replay that fails is logged and retried by the worker: it never stops the start."""
        self._apply_logged()
        self.first = self.first or ApplyReport()
        self._threads = [threading.Thread(target=self._run, name="catalog", daemon=True),
                         threading.Thread(target=self._run_merges, name="catalog-merge", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop the workers (after the merge one is writing) and close the store (idempotent)."""
        self._stop.set()
        self._wake.set()
        self._merge_due.set()
        for t in self._threads:
            t.join(timeout=600)
        self.store.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.retry_s if self.last_error else WATCH_S)
            self._wake.clear()
            if not self._stop.is_set():
                if self.holder.refresh():
                    idx = self.holder.current()
                    log.info("index: now %s (%d items), made live by another process", idx.generation, idx.size)
                self._apply_logged()

    def _run_merges(self) -> None:
        while not self._stop.is_set():
            self._merge_due.wait(self.config.retry_s if self.merge_error else None)
            self._merge_due.clear()
            if not self._stop.is_set() and self.merge_due():
                self._logged(self.merge)

    def _apply_logged(self) -> None:
        if self._logged(self.apply) and self.merge_due():
            self._merge_due.set()

    def _logged(self, work) -> bool:
        try:
            work()
            return True
        except ApplianceError as e:
            if self.last_error is None:
                log.error("catalog: the index could not be brought up to date (%s); retrying every %g s", e,
                          self.config.retry_s)
            self.last_error = str(e)
        except Exception as e:
            log.exception("catalog: updating the index crashed; retrying")
            self.last_error = f"{type(e).__name__}: {e}"
        return False

    # ---- the delta -----------------------------------------------------------------------------------
    def applied_seq(self, idx: CatalogIndex | None = None) -> int:
        """The store seq the live index (or ``idx``) holds (0: it was made without this store — a CLI folder
        build, a shipped generation, an older version's index: everything is replayed onto it)."""
        mark = (idx or self.holder.current()).store_seq
        return mark[1] if mark is not None and mark[0] == self.store.id else 0

    def apply(self) -> ApplyReport:
        """Bring the live index up to date with the store; returns what it did. Changes go into the delta (no
        generation written); a base not made from this store gets them all in one merge instead."""
        with self._apply_lock:
            report = ApplyReport()
            self.holder.refresh()
            base = self.holder.base()
            if self._foreign(base) and base.generation != self.store.meta(UNSTAMPED) \
                    and not self.merge(report):  # nothing to replay onto it: the delta starts over it as it is
                self.store.set_meta(UNSTAMPED, base.generation)
            if self.store.seq() > self.applied_seq():
                view = self.holder.current()
                rows, top = self.store.changes_since(self.applied_seq(view), images=False)
                report.removed = [r.id for r in rows if r.removed and view.has(r.id)]
                for start in range(0, len(rows), APPLY_BATCH):  # a start's whole delta: a batch in memory at a time
                    batch = rows[start:start + APPLY_BATCH]
                    last = start + APPLY_BATCH >= len(rows)
                    self.holder.apply_delta([self._change(row, report) for row in batch], top if last else batch[-1].seq)
                if not rows:
                    self.holder.apply_delta([], top)
            report.seq = self.applied_seq()
            self._mark(report.seq)
            self._done(report)
            return report

    def _mark(self, seq: int) -> None:
        """Record in the index folder that the index holds the store up to ``seq`` (index/store_mark.py)."""
        if seq <= 0 or self._marked == (self.store.id, seq):
            return
        try:
            write_store_mark(self.holder.config.path, self.store.id, seq)
            self._marked = (self.store.id, seq)
        except OSError as e:  # a full disk: only this extra check is lost until the next apply
            log.warning("catalog: cannot record the store's change %d in %s (%s)", seq, self.holder.config.path, e)

    def _foreign(self, base: CatalogIndex) -> bool:
        """Whether ``base`` was made without this store (a folder build, a shipped generation, an older version)."""
        return base.store_seq is None or base.store_seq[0] != self.store.id

    def _change(self, row: StoredItem, report: ApplyReport) -> DeltaChange:
        if row.removed:
            return DeltaChange(row.id, row.seq, None)
        found = self._item(row, report)
        if found is None:  # cannot be indexed: hides the older version all the same, as a rebuild would
            return DeltaChange(row.id, row.seq, None)
        return DeltaChange(row.id, row.seq, found[0], keep_item=not found[1])

    def _item(self, row: StoredItem, report: ApplyReport) -> tuple[CatalogItem, bool] | None:
        """The encoded item of a store row and whether the store keeps its encoding: from memory (just enrolled),
        the store's encoded copy, or — after another process's enrolment without one, a damaged copy — encoded
        again from the kept original (and its copy kept). None when it cannot be indexed (in ``report.skipped``)."""
        with self._cond:
            cached = self._cache.get(row.id)
        if cached is not None and cached[0] == row.seq:
            report.enrolled.append(row.id)
            return cached[1], self.store.keeps_encoded
        item = self._stored_item(row.id, row.seq)
        if item is not None:
            report.enrolled.append(row.id)
            return item, True
        image = row.image
        if image is None:
            latest = self.store.get(row.id)
            if latest is None or latest.seq != row.seq:  # changed again since (during a merge): the newer change
                return None                             # is in the delta, which hides this id in the new base
            image = latest.image
        try:
            item = self.maker.make(decode_image(image or b"", self.images.max_pixels), row.id, row.label,
                                   attributes=row.attributes)
        except (InputError, ApplianceError) as e:
            log.warning("catalog: %s (change %d) cannot be indexed: %s", row.id, row.seq, e)
            report.skipped.append((row.id, str(e)))
            return None
        kept = False
        try:
            kept = self.store.put_encoded(row.id, row.seq, encode_item(item, self._sha()))
        except (ApplianceError, CatalogIndexError) as e:  # a full disk: the delta holds it in memory instead
            log.warning("catalog: the encoding of %s (change %d) is not kept: %s", row.id, row.seq, e)
        report.enrolled.append(row.id)
        return item, kept

    def _stored_item(self, item_id: str, seq: int) -> CatalogItem | None:
        """Change ``seq`` of ``item_id`` as encoded when it was enrolled (memory, else the store's copy); None when
        there is none or it is damaged. The live index reads a delta item's features and thumbnail through this."""
        with self._cond:
            cached = self._cache.get(item_id)
        if cached is not None and cached[0] == seq:
            return cached[1]
        try:
            data = self.store.encoded(item_id, seq)
            return decode_item(data, self._sha()) if data is not None else None
        except (StoreError, CatalogIndexError) as e:
            log.warning("catalog: the encoded copy of %s (change %d) is not usable (%s); using the original", item_id,
                        seq, e)
            self.damaged_copies = [*self.damaged_copies[-9:], {"id": item_id, "seq": seq, "why": str(e)}]
            return None

    def _sha(self) -> str:
        return self.holder.expected_bundle_sha256 or self.holder.base().bundle_sha256

    def _done(self, report: ApplyReport) -> None:
        if self.first is None:
            self.first = report
        self.last_error = None
        with self._cond:
            for item_id in [i for i, (seq, _) in self._cache.items() if seq <= report.seq]:
                del self._cache[item_id]
            self._cond.notify_all()

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Block until the live index holds store change ``seq`` (True) or ``timeout_s`` passed."""
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.applied_seq() < seq:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    return self.applied_seq() >= seq
        return True

    # ---- merges --------------------------------------------------------------------------------------
    def merge_due(self) -> bool:
        """Whether the delta names ``index.merge_after_items`` ids or more (time for a new base)."""
        return self.holder.current().delta_size >= self.holder.config.merge_after_items

    def merge(self, report: ApplyReport | None = None) -> bool:
        """Write a new base generation: under the build lock, the generation ``current`` names then plus every store
        change newer than it; swapped in while queries and enrolments go on (the delta keeps what came meanwhile).
        True when a generation was written. DiskFullError (the space for a whole generation is checked first) and a
        failed write leave the old base + delta serving; the reason is in health (``index.merge_error``)."""
        report = report if report is not None else ApplyReport()
        with self._merge_lock:
            self.merging = True
            t0 = time.monotonic()
            try:
                self._measure_generation()
                ensure_free(self.holder.path, self._gen_bytes[1], self.config.min_free_mb)
                written = self.holder.rebuild_with(lambda cur: self._plan(cur, report))
            except ApplianceError as e:
                if self.merge_error is None:
                    log.error("catalog: merging the delta into a new generation failed (%s); still serving the old "
                              "one and the delta, retrying every %g s", e, self.config.retry_s)
                self.merge_error = str(e)
                raise
            finally:
                self.merging = False
            self.merge_error = None
            if written:
                base = self.holder.base()
                self._rebuild_s = time.monotonic() - t0
                self.last_merge = {"generation": base.generation, "items": base.size, "seq": self.applied_seq(base),
                                   "duration_s": round(self._rebuild_s, 2),
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                log.info("catalog: %s up to store change %d: %d (re-)enrolled, %d removed, %d skipped, in %.1f s",
                         base.generation, self.applied_seq(base), len(report.enrolled), len(report.removed),
                         len(report.skipped), self._rebuild_s)
                self._logged(lambda: self.store.drop_encoded(self.applied_seq(base)))
        return written

    def _plan(self, cur: CatalogIndex, report: ApplyReport):
        rows, top = self.store.changes_since(self.applied_seq(cur), images=False)
        report.seq = max(top, self.applied_seq(cur))
        if not rows:
            return None
        report.removed = [r.id for r in rows if r.removed and cur.has(r.id)]
        added = (found[0] for row in rows if not row.removed and (found := self._item(row, report)) is not None)
        return itertools.chain(cur.stored_items(skip={r.id for r in rows}), added), (self.store.id, top)

    def pending(self) -> int:
        """Enrolments acknowledged here and not yet in the live index."""
        with self._cond:
            return len(self._cache)

    def _ensure_space(self, change_bytes: int) -> None:
        """A change must fit with the reserve (a merge checks the space for a whole generation itself)."""
        ensure_free(self.store.path, change_bytes, self.config.min_free_mb)

    def _measure_generation(self) -> None:
        """The bytes of the live base (what the next merge writes again, about), measured once per generation.
        Another process (a CLI `index build`) may have made a newer one live and removed this one from disk before
        the worker noticed: then the holder follows it now; if that is gone too, the last size stands."""
        for _ in range(2):
            idx = self.holder.base()
            if self._gen_bytes[0] == idx.generation:
                return
            try:
                self._gen_bytes = (idx.generation, sum(p.stat().st_size for p in idx.path.iterdir() if p.is_file()))
                return
            except FileNotFoundError:
                self.holder.refresh()

    def index_health(self) -> IndexHealth:
        """The live index: items, generation, folder, trees and search_k; the base, the delta and the last merge."""
        idx = self.holder.current()
        return IndexHealth(size=idx.item_count, photos=idx.size, generation=idx.generation, path=str(self.holder.path), n_trees=idx.n_trees,
                           search_k=self.holder.config.search_k, base_size=idx.base.size, delta_items=idx.delta_items,
                           delta_removed=idx.delta_removed, merge_after_items=self.holder.config.merge_after_items,
                           merging=self.merging, last_merge=self.last_merge, merge_error=self.merge_error)

    def adaptation(self) -> dict:
        """The live generation's catalog-adapted projection, or why there is none."""
        idx = self.holder.current()
        if idx.projection is not None:
            return idx.projection.describe()
        return {"enabled": False, "why": "recognition.adapt is false" if not self.maker.recognition.adapt else
                "the index was built without a catalog-adapted projection (rebuild it with `index build`)"}

    def health(self) -> CatalogHealth:
        """The store, what waits, what the first replay did, what was set aside, the last error."""
        first = self.first
        return CatalogHealth(
            store=str(self.store.path), seq=self.store.seq(), applied_seq=self.applied_seq(), pending=self.pending(),
            **self.store.counts(), last_error=self.last_error,
            reconciled_at_start=None if first is None else len(first.enrolled),
            removals_applied_at_start=None if first is None else len(first.removed),
            skipped=[] if first is None else [{"id": i, "why": w} for i, w in first.skipped],
            migrated=self.migrated, set_aside=self.set_aside, damaged_encodings=self.damaged_copies,
            store_went_back=self.store.went_back, store_read_only=self.store.read_only)
