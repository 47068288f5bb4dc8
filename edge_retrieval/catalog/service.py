"""The catalog service: enrol, remove and keep the live index in step with the catalog store — the one path that
HTTP (edge_retrieval/app/appliance.py → edge_retrieval/web/) and the CLI (``catalog add|remove``, ``index build``) both take.

- An enrolment is validated and encoded first, then committed to the store (edge_retrieval/catalog/store.py), and only then
  acknowledged; a removal is a committed tombstone. The encoded item waits in memory for the rebuild (at most
  ``catalog.max_pending_enrolments``; more get BusyError → 503 + Retry-After).
- A rebuild (``apply``) replays, under the index build lock, every store change newer than the generation that
  ``current`` names *at that moment* (whoever made it: this server, the CLI, a shipped generation), and records
  the store seq it reached in the new generation. So no order of rebuilds, crashes and restarts can revert a
  re-enrolment or bring back a removed item, and a CLI build is never overwritten — it is built upon.
- One background worker does it: woken by each change, every ``WATCH_S`` (a generation made live by another
  process) and every ``catalog.retry_s`` while a rebuild fails (a full disk): it recovers by itself.
- Free space is checked before anything is acknowledged (DiskFullError → 507).
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_retrieval.catalog.build import ItemMaker, scan_folder
from edge_retrieval.catalog.ids import load_labels, validate_id, validate_label
from edge_retrieval.catalog.store import CatalogStore, StoredItem, ensure_free
from edge_retrieval.core.config import CatalogConfig, ImagesConfig
from edge_retrieval.core.errors import ApplianceError, BusyError, InputError
from edge_retrieval.core.status import CatalogHealth, IndexHealth
from edge_retrieval.imaging.codec import decode_image, encode_jpeg
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.reader import CatalogIndex, CatalogItem

log = logging.getLogger(__name__)
WATCH_S = 5.0  # how often the worker looks whether another process made another generation live
ORIGINAL_JPEG_QUALITY = 95  # the enrolled original kept in the store (the item is re-encoded from it)
MIGRATED = "migrated_enrolled_dir"


@dataclass
class ApplyReport:
    """What one replay changed: ids (re-)enrolled, removals applied, rows that could not be indexed."""

    enrolled: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seq: int = 0


class CatalogService:
    """The catalog store + the live index + the item maker, and the worker that keeps them in step."""

    def __init__(self, config: CatalogConfig, holder: IndexHolder, maker: ItemMaker, *,
                 images: ImagesConfig = ImagesConfig(), set_aside: list[dict] | None = None):
        """Open (or create) ``config.store``; its first start migrates ``config.enrolled_dir`` (originals,
        labels.json, removed.json of older versions; damaged ones are skipped and logged)."""
        self.config = config
        self.holder = holder
        self.maker = maker
        self.images = images
        self.store = CatalogStore(config.store, derived_from=holder.current().store_seq)
        self.migrated = migrate_enrolled_dir(self.store, config.enrolled_dir)
        self.set_aside = list(set_aside or []) + holder.set_aside
        self.first: ApplyReport | None = None
        self.last_error: str | None = None
        self._cache: dict[str, tuple[int, CatalogItem]] = {}  # acknowledged, encoded, not yet in the index
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rebuild_s = 1.0
        self._gen_bytes: tuple[str, int] = ("", 0)

    # ---- running -------------------------------------------------------------------------------------
    def start(self) -> CatalogService:
        """Replay what the live generation lacks (as a start must), then run the worker. A replay that fails
        (a full disk) is logged and retried by the worker: it never stops the start."""
        self._apply_logged()
        self.first = self.first or ApplyReport()
        self._thread = threading.Thread(target=self._run, name="catalog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the worker (after the rebuild it is doing) and close the store (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
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

    def _apply_logged(self) -> None:
        try:
            self.apply()
        except ApplianceError as e:
            if self.last_error is None:
                log.error("catalog: the index could not be brought up to date (%s); retrying every %g s", e,
                          self.config.retry_s)
            self.last_error = str(e)
        except Exception as e:
            log.exception("catalog: rebuild crashed; retrying")
            self.last_error = f"{type(e).__name__}: {e}"

    # ---- the replay ------------------------------------------------------------------------------------
    def applied_seq(self, idx: CatalogIndex | None = None) -> int:
        """The store seq the live generation holds (0: it was made without this store — a CLI folder build,
        a shipped generation, an older version's index: everything is replayed onto it)."""
        mark = (idx or self.holder.current()).store_seq
        return mark[1] if mark is not None and mark[0] == self.store.id else 0

    def apply(self) -> ApplyReport:
        """Bring the live index up to date with the store, in at most one rebuild; returns what it did."""
        report = ApplyReport()
        if self.store.seq() <= self.applied_seq() and not self.holder.refresh():
            report.seq = self.applied_seq()
            self._done(report)
            return report
        t0 = time.monotonic()

        def plan(cur: CatalogIndex):
            rows, top = self.store.changes_since(self.applied_seq(cur))
            report.seq = max(top, self.applied_seq(cur))
            if not rows:
                return None
            added = [item for row in rows if (item := self._item(row, report)) is not None]
            report.removed = [r.id for r in rows if r.removed and cur.has(r.id)]
            kept = cur.stored_items(skip={r.id for r in rows})
            return itertools.chain(kept, added), (self.store.id, top)

        if self.holder.rebuild_with(plan):
            self._rebuild_s = time.monotonic() - t0
            log.info("catalog: %s up to store change %d: %d (re-)enrolled, %d removed, %d skipped",
                     self.holder.current().generation, report.seq, len(report.enrolled), len(report.removed),
                     len(report.skipped))
        self._done(report)
        return report

    def _item(self, row: StoredItem, report: ApplyReport) -> CatalogItem | None:
        if row.removed:
            return None
        with self._cond:
            cached = self._cache.get(row.id)
        try:
            if cached is not None and cached[0] == row.seq:
                item = cached[1]
            else:  # after a restart, or another process's enrolment: re-encode the kept original
                item = self.maker.make(decode_image(row.image or b"", self.images.max_pixels), row.id, row.label)
        except (InputError, ApplianceError) as e:
            log.warning("catalog: %s (change %d) cannot be indexed: %s", row.id, row.seq, e)
            report.skipped.append((row.id, str(e)))
            return None
        report.enrolled.append(row.id)
        return item

    def _done(self, report: ApplyReport) -> None:
        if self.first is None:
            self.first = report
        self.last_error = None
        with self._cond:
            for item_id in [i for i, (seq, _) in self._cache.items() if seq <= report.seq]:
                del self._cache[item_id]
            self._cond.notify_all()

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Block until the live generation holds store change ``seq`` (True) or ``timeout_s`` passed."""
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.applied_seq() < seq:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    return self.applied_seq() >= seq
        return True

    # ---- changes ---------------------------------------------------------------------------------------
    @staticmethod
    def validate(item_id: str | None, label: str) -> tuple[str, str]:
        """(id, label) checked against the rules (a new id when none is given); InputError (400)."""
        return validate_id(item_id or f"enrolled/{uuid.uuid4().hex[:12]}"), validate_label(label)

    def enrol(self, rgb: np.ndarray, item_id: str | None, label: str) -> dict:
        """Encode ``rgb`` as catalog item ``item_id``, commit its original to the store, and queue the rebuild.
        When this returns the enrolment is durable. InputError (400) before anything is written, BusyError
        (503) with too many waiting, DiskFullError (507) without the space for it and a rebuild."""
        item_id, label = self.validate(item_id, label)
        with self._cond:
            waiting = len(self._cache)
        if waiting >= self.config.max_pending_enrolments:
            raise BusyError(f"{waiting} enrolments are waiting to be indexed (catalog.max_pending_enrolments); "
                            "try again shortly", retry_after_s=max(1, round(self._rebuild_s)))
        item = self.maker.make(rgb, item_id, label)
        jpeg = encode_jpeg(rgb, ORIGINAL_JPEG_QUALITY)
        self._ensure_space(2 * len(jpeg))
        seq = self.store.put(item_id, label, jpeg)
        with self._cond:
            self._cache[item_id] = (seq, item)
        self._wake.set()
        return {"id": item_id, "label": item.label, "status": "queued", "seq": seq}

    def remove(self, item_id: str) -> int | None:
        """Commit the removal of ``item_id`` (a tombstone) and queue the rebuild; returns its store seq, or None
        when the id is neither in the index nor waiting in the store (nothing is written then)."""
        row = self.store.get(item_id)
        if not self.holder.current().has(item_id) and (row is None or row.removed):
            return None
        self._ensure_space(0)
        seq = self.store.remove(item_id)
        with self._cond:
            self._cache.pop(item_id, None)
        self._wake.set()
        return seq

    def pending(self) -> int:
        """Enrolments acknowledged here and not yet in the live index."""
        with self._cond:
            return len(self._cache)

    def _ensure_space(self, change_bytes: int) -> None:
        """A change must fit with a whole new generation (a rebuild writes one) and the reserve."""
        self._measure_generation()
        same = _device(self.store.path) == _device(self.holder.path)
        ensure_free(self.store.path, change_bytes + (self._gen_bytes[1] if same else 0), self.config.min_free_mb)
        if not same:
            ensure_free(self.holder.path, self._gen_bytes[1], self.config.min_free_mb)

    def _measure_generation(self) -> None:
        """The bytes of the live generation (what the next rebuild writes again), measured once per generation.
        Another process (a CLI `index build`) may have made a newer one live and removed this one from disk before
        the worker noticed: then the holder follows it now; if that is gone too, the last size stands."""
        for _ in range(2):
            idx = self.holder.current()
            if self._gen_bytes[0] == idx.generation:
                return
            try:
                self._gen_bytes = (idx.generation, sum(p.stat().st_size for p in idx.path.iterdir() if p.is_file()))
                return
            except FileNotFoundError:
                self.holder.refresh()

    def index_health(self) -> IndexHealth:
        """The live index: items, generation, folder, trees and search_k."""
        idx = self.holder.current()
        return IndexHealth(size=idx.size, generation=idx.generation, path=str(self.holder.path), n_trees=idx.n_trees,
                           search_k=self.holder.config.search_k)

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
            migrated=self.migrated, set_aside=self.set_aside, store_went_back=self.store.went_back,
            store_read_only=self.store.read_only)


def _device(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def migrate_enrolled_dir(store: CatalogStore, folder: Path) -> dict | None:
    """At a store's first start, import what older versions kept in ``folder`` (originals ``<id>.jpg``,
    ``labels.json``, ``removed.json``) in one transaction. A damaged labels/removal file is skipped and logged
    (labels fall back to the file name), never fatal. Returns what was imported (None: done before)."""
    if store.meta(MIGRATED) is not None:
        return None
    folder = Path(folder)
    labels, removed = _legacy_json(folder / "labels.json"), _legacy_json(folder / "removed.json")
    removed_at = (folder / "removed.json").stat().st_mtime if (folder / "removed.json").is_file() else 0.0
    rows: list[tuple[str, bool, str | None, bytes | None]] = []
    skipped: list[str] = []
    live: set[str] = set()
    for path in scan_folder(folder) if folder.is_dir() else []:
        item_id = path.relative_to(folder).with_suffix("").as_posix()
        try:
            validate_id(item_id)
            # saved after its removal was journalled (a re-enrolment), or never removed
            if item_id in removed and path.stat().st_mtime < removed_at:
                continue
            rows.append((item_id, False, labels.get(item_id) or Path(item_id).name, path.read_bytes()))
            live.add(item_id)
        except (OSError, InputError) as e:
            log.warning("migration: %s skipped: %s", path, e)
            skipped.append(item_id)
    rows += [(i, True, None, None) for i in sorted(removed) if i not in live]
    store.import_rows(rows, MIGRATED)
    report = {"from": folder.name, "enrolled": len(live), "removed": len(rows) - len(live), "skipped": skipped}
    if rows or skipped:
        log.info("catalog store %s: migrated %d enrolled items and %d removals from %s (no longer read)",
                 store.path, report["enrolled"], report["removed"], folder)
    return report


def _legacy_json(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        return load_labels(path)
    except Exception as e:  # noqa: BLE001 - truncated, empty, [], invalid UTF-8: derived state, never fatal
        log.error("migration: %s is damaged (%s: %s); ignored", path, type(e).__name__, e)
        return {}
