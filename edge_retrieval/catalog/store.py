"""The catalog store: the one source of truth for what the catalog holds, in one SQLite database (stdlib
``sqlite3``, WAL journal, ``synchronous=FULL``: a committed change survives a power cut).

Every change — an enrolment (id, label, the original JPEG) or a removal (a tombstone) — gets the next value of
one monotonically increasing change sequence number (``seq``) in the same transaction that writes it, so the
row of an id always carries the seq of its latest change. An index generation records the store's id and the
highest seq it contains (edge_retrieval/index/reader.py ``IndexMeta.store``); whoever rebuilds replays every row newer than
that (edge_retrieval/catalog/service.py). An HTTP 202 or a CLI "enrolled" is said only after the commit.

Also here: the lock file that keeps a second ``serve`` off the same state, and the free-space check.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge_retrieval.core.errors import DiskFullError, StoreError
from edge_retrieval.core.photos import PHOTO_SEP

SCHEMA_VERSION = 2  # 2: the attributes column (a store of schema 1 gets it at its first writable open)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,              -- the entry key: an item's first photo is its id, a further one <id>#<photo>
    seq INTEGER NOT NULL UNIQUE,      -- the change sequence number of this id's latest change
    removed INTEGER NOT NULL,         -- 1: a tombstone (the removal of the id, also of a catalog-folder item)
    label TEXT,
    image BLOB,                       -- the enrolled original (JPEG), NULL for a tombstone
    changed TEXT NOT NULL,            -- UTC time of the change
    attributes TEXT                   -- the item's attributes, a JSON object (NULL: none)
);
"""
# The encoded copy of an enrolment (edge_retrieval/index/encoded_item.py), kept while the change is in the index's delta
# (not yet merged into a generation): a restart rebuilds the delta from it without the model. Derived, never the truth.
_ENCODED = """CREATE TABLE IF NOT EXISTS encoded (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, data BLOB NOT NULL)"""
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_BYTES = 1 << 20  # less free than this at start: the disk is full (SQLite cannot make its WAL index)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredItem:
    """One row of the store: the latest change of ``id``."""

    id: str
    seq: int
    removed: bool
    label: str | None
    image: bytes | None
    attributes: dict[str, str] = field(default_factory=dict)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the disk (or the quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return isinstance(exc, sqlite3.Error) and ("disk is full" in str(exc) or "SQLITE_FULL" in str(exc))


class CatalogStore:
    """The SQLite catalog store at ``path`` (created on first use). Thread-safe; several processes may use it
    at once (the CLI while ``serve`` runs): writers are serialised by SQLite (``BEGIN IMMEDIATE``)."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 30.0,
                 derived_from: tuple[str, int] | None = None):
        """Open (or create) the store. ``derived_from`` is (store id, seq) of the live index generation: the store
        and the index must agree on where the catalog stands. A store missing or empty (0 bytes) while the index
        was made from a store's changes is StoreError (the truth is lost: restore it, nothing is created); a
        store whose seq is below the index's (an older backup restored, a WAL lost) takes a new id, so that the
        whole store is replayed onto the index and every later change is numbered past it (``went_back``)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self.went_back: dict | None = None
        if derived_from is not None and derived_from[1] > 0 and (not self.path.is_file()
                                                                   or self.path.stat().st_size == 0):
            raise StoreError(
                f"catalog store {self.path} is {'empty (0 bytes)' if self.path.is_file() else 'missing'}, but the "
                f"index was made from store {derived_from[0][:8]}… up to its change {derived_from[1]}: the catalog's "
                "originals and removals would be lost. Restore catalog.store from a backup (an older one is fine: "
                "the index is re-derived from it); or, to give them up and start with an empty catalog, move the "
                "store file and the index folder (index.path) away")
        self._timeout_s = busy_timeout_s
        self.read_only: str | None = None  # why the store is open read-only: a full disk at start
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            # Written only when new: a start on a full disk must still read the catalog.
            if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'items'").fetchone():
                with self._write() as db:
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(stmt)
                    db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('store_id', ?), ('seq', '0')",
                               (str(SCHEMA_VERSION), uuid.uuid4().hex))
            schema = int(self.meta("schema") or 0)
            if schema == 1:  # the attributes column (an older store, first opened by this version)
                with self._write() as db:
                    db.execute("ALTER TABLE items ADD COLUMN attributes TEXT")
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
                schema = SCHEMA_VERSION
        except DiskFullError:
            raise
        except (sqlite3.Error, OSError, ValueError) as e:
            if getattr(self, "_db", None) is not None:
                self._db.close()
            if not self._open_read_only():
                raise StoreError(f"catalog store {self.path} cannot be opened ({e}); it is the catalog's source of "
                                 "truth: restore it from a backup, or move it away to start with an empty catalog "
                                 "(catalog.store)") from None
            mode, schema = "wal", int(self.meta("schema") or 0)
        self._attrs = "attributes" if schema == SCHEMA_VERSION else "NULL"  # read-only schema 1: no column yet
        if schema not in (1, SCHEMA_VERSION) or (schema == 1 and self.read_only is None):
            raise StoreError(f"catalog store {self.path} has schema {schema}; this device reads {SCHEMA_VERSION}")
        if mode.lower() != "wal":
            raise StoreError(f"catalog store {self.path}: the file system refused the WAL journal ({mode})")
        self.id = self.meta("store_id")
        if derived_from is not None and derived_from[0] == self.id and derived_from[1] > self.seq():
            self._went_back(derived_from[1])
        self.keeps_encoded = self._ensure_encoded_table()

    def _went_back(self, index_seq: int) -> None:
        """The store is behind the index that was derived from it: a new store id makes every row newer than
        anything the index holds, so the next replay re-derives the index from the store (and a change is never
        acknowledged with a seq the index already claims). Logged, kept in the meta table, shown in health."""
        old, seq = self.id, self.seq()
        self.went_back = {"store_seq": seq, "index_seq": index_seq, "time": _now(), "previous_id": old,
                          "why": f"the store is at change {seq} but the index holds change {index_seq} of it (an "
                                 "older catalog.sqlite restored, or its WAL lost): the index is re-derived from the "
                                 "store; items enrolled after that point stay until removed or the next index build"}
        try:
            with self._write() as db:  # only if no other process re-based it meanwhile
                db.execute("UPDATE meta SET value = ? WHERE key = 'store_id' AND value = ?", (uuid.uuid4().hex, old))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('went_back', ?)", (json.dumps(self.went_back),))
        except DiskFullError:
            self.went_back["why"] += "; the disk is full, so this is retried at the next start"
        self.id = self.meta("store_id")
        log.error("catalog store %s: %s", self.path, self.went_back["why"])

    def _connect(self, uri: str | None = None) -> sqlite3.Connection:
        return sqlite3.connect(uri or self.path, timeout=self._timeout_s, isolation_level=None,
                               check_same_thread=False, uri=uri is not None)

    def _open_read_only(self) -> bool:
        """A start on a full disk serves what it has: SQLite cannot create the WAL index of a cleanly closed
        store there ("disk I/O error"), so the store is read without one — ``immutable`` when no WAL holds
        changes (a clean stop), else plain read-only. Writes reopen it once space is back (``_write``)."""
        st = os.statvfs(self.path.parent)
        if st.f_bavail * st.f_frsize >= _FULL_BYTES or not self.path.is_file():
            return False
        wal = Path(f"{self.path}-wal")
        clean = not wal.exists() or wal.stat().st_size == 0
        for flags in (("immutable=1",) if clean else ()) + ("mode=ro",):
            try:
                db = self._connect(f"{self.path.resolve().as_uri()}?{flags}")
                db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            except sqlite3.Error:
                continue
            self._db, self.read_only = db, (f"the disk of {self.path} is full: the catalog store is read, and "
                                            "changes are refused until space is freed")
            log.error("catalog store: %s", self.read_only)
            return True
        return False

    def _writable(self) -> None:
        """Reopen a store opened read-only (a full disk at start) for writing once that works again."""
        try:
            db = self._connect()
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            with contextlib.suppress(UnboundLocalError, sqlite3.Error):
                db.close()
            raise DiskFullError(f"{self.read_only}; nothing was changed") from None
        self._db, old, self.read_only = db, self._db, None
        old.close()
        log.info("catalog store %s: writable again", self.path)

    def _ensure_encoded_table(self) -> bool:
        """The ``encoded`` table, added to a store of an older version at its first open; False when it cannot be
        (a full disk): enrolments are then re-encoded from their originals when needed."""
        try:
            if not self._query("SELECT 1 FROM sqlite_master WHERE name = 'encoded'", ()):
                with self._write() as db:
                    db.execute(_ENCODED)
            return True
        except (DiskFullError, StoreError):
            return False

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (committed durably on leaving); a full disk is DiskFullError."""
        with self._lock:
            if self.read_only is not None:
                self._writable()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as e:
                if disk_full(e):
                    raise DiskFullError(f"the disk holding the catalog store {self.path} is full; nothing was "
                                        "changed") from None
                raise StoreError(f"catalog store {self.path}: {e}") from None

    def _next_seq(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'seq'")
        return int(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def put(self, item_id: str, label: str, image: bytes, encoded: bytes | None = None, *,
            attributes: dict[str, str] | None = None, replacing: Iterable[str] = ()) -> int:
        """Enrol (or re-enrol) the entry ``item_id`` (an item's first photo, or ``<id>#<photo>``) with ``label``,
        ``attributes`` and its original JPEG ``image`` (and, in the same transaction, its ``encoded`` copy, and
        the removal of the entries ``replacing``: the other photos of an item enrolled anew); returns its seq.
        Committed when this returns."""
        with self._write() as db:
            for key in replacing:
                self._tombstone(db, key)
            seq = self._next_seq(db)
            db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, 0, ?, ?, ?, ?)",
                       (item_id, seq, label, image, _now(), _attrs_json(attributes)))
            if self.keeps_encoded:
                db.execute("DELETE FROM encoded WHERE id = ?", (item_id,))
                if encoded is not None:
                    db.execute("INSERT INTO encoded VALUES (?, ?, ?)", (item_id, seq, encoded))
        return seq

    def encoded(self, item_id: str, seq: int) -> bytes | None:
        """The encoded copy of change ``seq`` of ``item_id`` (None: none kept, or it is of another change)."""
        if not self.keeps_encoded:
            return None
        rows = self._query("SELECT data FROM encoded WHERE id = ? AND seq = ?", (item_id, seq))
        return bytes(rows[0][0]) if rows else None

    def put_encoded(self, item_id: str, seq: int, encoded: bytes) -> bool:
        """Keep ``encoded`` for change ``seq`` of ``item_id`` (re-encoded from its original) if that is still the
        id's latest change; False when it is not kept (not the latest, or the table is missing)."""
        if not self.keeps_encoded:
            return False
        with self._write() as db:
            cur = db.execute("INSERT OR REPLACE INTO encoded SELECT id, seq, ? FROM items WHERE id = ? AND seq = ? "
                             "AND removed = 0", (encoded, item_id, seq))
            return cur.rowcount > 0

    def drop_encoded(self, upto_seq: int) -> None:
        """Forget the encoded copies of changes up to ``upto_seq`` (a generation holding them is live)."""
        if self.keeps_encoded:
            with self._write() as db:
                db.execute("DELETE FROM encoded WHERE seq <= ?", (upto_seq,))

    def remove(self, item_id: str) -> int:
        """Record the removal of ``item_id`` (a tombstone, which keeps a catalog-folder item out of later
        builds too); returns its seq. Committed when this returns."""
        with self._write() as db:
            return self._tombstone(db, item_id)

    def remove_all(self, keys: Iterable[str]) -> int:
        """Record the removal of every entry in ``keys`` (all the photos of an item) in one transaction; returns
        the seq of the last."""
        with self._write() as db:
            seq = 0
            for key in keys:
                seq = self._tombstone(db, key)
            return seq

    def _tombstone(self, db: sqlite3.Connection, item_id: str) -> int:
        seq = self._next_seq(db)
        db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, 1, NULL, NULL, ?, NULL)", (item_id, seq, _now()))
        if self.keeps_encoded:
            db.execute("DELETE FROM encoded WHERE id = ?", (item_id,))
        return seq

    def photo_keys(self, item_id: str) -> list[str]:
        """The entry keys of the enrolled (not removed) photos of item ``item_id``, its first photo first."""
        rows = self._query("SELECT id FROM items WHERE removed = 0 AND (id = ? OR substr(id, 1, ?) = ?) ORDER BY seq",
                           (item_id, len(item_id) + 1, item_id + PHOTO_SEP))
        return sorted((r[0] for r in rows), key=lambda k: k != item_id)

    def import_rows(self, rows: Iterable[tuple], marker: str) -> int:
        """Write many changes ``(id, removed, label, image[, attributes])`` and the meta key ``marker`` in ONE
        transaction (a migration, an import: all of it or nothing); returns the number of rows."""
        n = 0
        with self._write() as db:
            for item_id, removed, label, image, *attributes in rows:
                db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (item_id, self._next_seq(db), int(removed), label, image, _now(),
                            _attrs_json(attributes[0] if attributes else None)))
                n += 1
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (marker, _now()))
        return n

    def changes_since(self, seq: int, *, images: bool = True) -> tuple[list[StoredItem], int]:
        """(the rows whose latest change is newer than ``seq``, in seq order; the store's seq) — one snapshot.
        ``images`` False leaves the originals out (``image`` None; ``get`` reads one when needed)."""
        image = "image" if images else "NULL"
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    rows = self._db.execute(f"SELECT id, seq, removed, label, {image}, {self._attrs} FROM items "
                                            "WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
                    top = int(self._db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"catalog store {self.path}: {e}") from None
        return [_row(r) for r in rows], top

    def summary(self) -> list[StoredItem]:
        """Every row without its original (``image`` None; an export reads them one by one), in seq order."""
        return [_row(r) for r in self._query(f"SELECT id, seq, removed, label, NULL, {self._attrs} FROM items "
                                             "ORDER BY seq", ())]

    def get(self, item_id: str) -> StoredItem | None:
        """The latest change of the entry ``item_id`` (None: the store never heard of it)."""
        rows = self._query(f"SELECT id, seq, removed, label, image, {self._attrs} FROM items WHERE id = ?",
                           (item_id,))
        return _row(rows[0]) if rows else None

    def seq(self) -> int:
        """The seq of the latest change committed."""
        return int(self.meta("seq") or 0)

    def counts(self) -> dict[str, int]:
        """How many enrolled items and tombstones the store holds."""
        by = dict(self._query("SELECT removed, COUNT(*) FROM items GROUP BY removed", ()))
        return {"enrolled": by.get(0, 0), "removed": by.get(1, 0)}

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the store's meta table (not ``seq`` or ``store_id``, which the store keeps itself)."""
        if key in ("seq", "store_id", "schema"):
            raise StoreError(f"catalog store {self.path}: meta key {key!r} is the store's own")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        """A value of the store's meta table (``store_id``, ``seq``, a migration marker)."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def _query(self, sql: str, args: tuple) -> list:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"catalog store {self.path}: {e}") from None

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()


def _attrs_json(attributes: dict[str, str] | None) -> str | None:
    return json.dumps(attributes, ensure_ascii=False, sort_keys=True) if attributes else None


def _row(r: tuple) -> StoredItem:
    try:
        attributes = json.loads(r[5]) if r[5] else {}
    except ValueError:  # written by this module only; a hand-edited row shows none rather than failing a replay
        attributes = {}
    return StoredItem(r[0], r[1], bool(r[2]), r[3], r[4], attributes if isinstance(attributes, dict) else {})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def hold_serve_lock(store_path: str | os.PathLike) -> int:
    """Take ``<store>.serve.lock`` (fcntl.flock, held until the process exits) so that one ``serve`` at a time
    runs on this state; returns the open descriptor (keep it). StoreError names the holder (pid, host)."""
    path = Path(f"{store_path}.serve.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreError(f"another `serve` already runs on this state ({holder}; lock {path}): stop it first, "
                         "or give this one its own catalog.store and index.path") from None
    with contextlib.suppress(OSError):  # who holds it is a courtesy: a full disk must not stop the start
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return fd


def ensure_free(path: str | os.PathLike, need_bytes: int, reserve_mb: float) -> None:
    """DiskFullError unless the file system of ``path`` has ``need_bytes`` + ``reserve_mb`` free (for the
    service user: f_bavail)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes + reserve_mb * 1e6:
        raise DiskFullError(f"only {free / 1e6:.1f} MB free on the disk of {path}; this change needs "
                            f"{need_bytes / 1e6:.1f} MB plus the reserve of {reserve_mb:g} MB "
                            "(catalog.min_free_mb): free some space and try again")
