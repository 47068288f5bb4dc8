"""Recent lookups, kept across restarts: the last ``history.size`` LookupResults (and at most ``history.max_mb``),
each with a small JPEG snapshot of what was looked up (the camera frame or the uploaded photo), for the page's
"Recent lookups" strip and ``GET /api/history`` (JSON, CSV, snapshots).

They live in one SQLite file, ``history.dir/history.sqlite``, in WAL mode with ``synchronous=FULL``: each
lookup is one transaction (its result as JSON and its snapshot as a blob, inserted together with the pruning of
the oldest), committed before the lookup is answered. Why SQLite and not a JSON-lines file: an entry and its
snapshot are written, and the oldest ones deleted, atomically — a torn write (kill -9, a power cut) rolls back
that one transaction and nothing else, with no orphaned snapshot files or half lines to sweep, and the bounds
are kept without rewriting a file. Numbers (``n``) continue across restarts (AUTOINCREMENT never reuses one),
so ``/api/history/<n>/image.jpg`` links stay valid while the entry is kept.

A store that cannot be read (not a database, another schema) is moved aside and a new one started; a folder
that cannot be written keeps the history in memory for this run. Neither stops a start; both are logged."""
from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_retrieval.core.config import HistoryConfig
from edge_retrieval.core.errors import ImageError
from edge_retrieval.core.results import LookupResult
from edge_retrieval.imaging.codec import make_thumbnail

log = logging.getLogger(__name__)

STORE_NAME = "history.sqlite"
SCHEMA_VERSION = 1
_OLD_SNAPSHOT_GLOB = "lookup-*.jpg"  # the in-memory history of earlier versions kept its snapshots as files
CSV_COLUMNS = ("n", "time_utc", "source", "decision", "match_id", "match_label", "inliers", "rank_score", "score",
               "candidates", "total_ms", "items")
_SCHEMA = """CREATE TABLE IF NOT EXISTS lookups (
    n INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, also after the oldest rows are deleted
    result TEXT NOT NULL,                 -- LookupResult.to_json()
    snapshot BLOB                         -- small JPEG, or NULL
)"""


@dataclass(frozen=True)
class Entry:
    """One recorded lookup: its sequence number ``n`` (1, 2, … kept across restarts), the result, and whether a
    snapshot was kept."""

    n: int
    result: LookupResult
    has_image: bool

    def to_json(self) -> dict:
        """The LookupResult's JSON with ``n``, ``decision`` ("match" | "no_match") and ``has_image``."""
        body = self.result.to_json()
        return {"n": self.n, "decision": self.result.decision, "has_image": self.has_image, **body}


class History:
    """Bounded, thread-safe, persistent store of recent lookups (see the module docstring). The kept entries are
    also held in memory (without their snapshots), so listing them never touches the disk."""

    def __init__(self, config: HistoryConfig):
        self.config = config
        self.path = config.dir / STORE_NAME
        self._max_bytes = int(config.max_mb * 1024 * 1024)
        self._entries: deque[Entry] = deque()
        self._sizes: dict[int, int] = {}  # n → bytes it takes in the store (result JSON + snapshot)
        self._lock = threading.Lock()
        self._failing: str | None = None  # why the last write failed (logged once), None while writes succeed
        self._db = self._open()
        self._load()

    # ---- opening ----------------------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            self.config.dir.mkdir(parents=True, exist_ok=True)
            for old in self.config.dir.glob(_OLD_SNAPSHOT_GLOB):
                old.unlink()
            try:
                return _connect(self.path)
            except sqlite3.OperationalError:  # a full or failing disk, not a bad file: never moved aside
                raise
            except sqlite3.DatabaseError as e:
                aside = self.path.with_name(f"{STORE_NAME}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
                log.warning("history: %s cannot be read (%s); moved to %s, starting an empty history",
                            self.path, e, aside.name)
                for suffix in ("", "-wal", "-shm"):
                    src = Path(f"{self.path}{suffix}")
                    if src.exists():
                        src.replace(f"{aside}{suffix}")
                return _connect(self.path)
        except (OSError, sqlite3.Error) as e:
            log.warning("history: cannot keep lookups in %s (%s); keeping them in memory until the next start",
                        self.config.dir, getattr(e, "strerror", None) or e)
            return self._memory_copy()

    def _memory_copy(self) -> sqlite3.Connection:
        """An in-memory history that starts as a copy of the store on disk, read without writing (a full disk):
        its entries stay listed and numbering goes on after them (AUTOINCREMENT's counter is copied too)."""
        memory = _connect(":memory:")
        wal = Path(f"{self.path}-wal")
        flags = "mode=ro" if wal.exists() and wal.stat().st_size else "immutable=1"
        try:
            disk = sqlite3.connect(f"{self.path.resolve().as_uri()}?{flags}", uri=True)
            try:
                if disk.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                    disk.backup(memory)
            finally:
                disk.close()
        except (OSError, sqlite3.Error) as e:
            log.warning("history: %s cannot be read either (%s); numbering starts afresh in memory", self.path, e)
        return memory

    def _load(self) -> None:
        """Read the kept entries (oldest first); a row that does not parse is logged and deleted."""
        unreadable = []
        rows = self._db.execute("SELECT n, result, length(result) + coalesce(length(snapshot), 0), "
                                "snapshot IS NOT NULL FROM lookups ORDER BY n").fetchall()
        for n, text, size, has_image in rows:
            try:
                entry = Entry(n, LookupResult.from_json(json.loads(text)), bool(has_image))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("history: dropping lookup %d, which cannot be read (%s)", n, e)
                unreadable.append((n,))
                continue
            self._entries.append(entry)
            self._sizes[n] = size
        with self._lock:  # the bounds may have shrunk since the last run
            self._commit(lambda: self._db.executemany("DELETE FROM lookups WHERE n = ?", unreadable) and None, None)
        if self._entries:
            log.info("history: %d lookups kept from earlier runs (#%d … #%d)", len(self._entries),
                     self._entries[0].n, self._entries[-1].n)

    # ---- writing ----------------------------------------------------------------------------------------------
    def record(self, result: LookupResult, rgb: np.ndarray | None = None) -> Entry:
        """Keep ``result`` (and a snapshot of ``rgb``, the image it was made from), durably, before returning
        its entry (with its number); the oldest entries go when a bound is passed. A failing disk is logged, never raised: the
        entry is then kept in memory only, without its snapshot."""
        jpeg = None
        if rgb is not None:
            try:
                jpeg = make_thumbnail(rgb, self.config.snapshot_px)
            except ImageError as e:
                log.debug("history: no snapshot (%s)", e)
        text = json.dumps(result.to_json())
        size = len(text) + (len(jpeg) if jpeg is not None else 0)
        with self._lock:
            ok, n = self._commit(lambda: self._db.execute("INSERT INTO lookups (result, snapshot) VALUES (?, ?)",
                                                          (text, jpeg)).lastrowid, size)
            if ok:
                self._sizes[n] = size
            else:  # not in the store: a number of its own after the last one, never served as an image
                n, jpeg = (self._entries[-1].n if self._entries else 0) + 1, None
            entry = Entry(n, result, jpeg is not None)
            self._entries.append(entry)
            while len(self._entries) > self.config.size:
                self._sizes.pop(self._entries.popleft().n, None)
        return entry

    def _commit(self, change, size: int | None) -> tuple[bool, int | None]:
        """Run ``change`` (an insert of an entry of ``size`` bytes, returning its number; with ``size`` None,
        another change) and the pruning to the bounds as one transaction. (False, None), logged once, if it
        failed. Call it with the lock held."""
        try:
            with self._db:  # one transaction: committed (and fsynced) here, or rolled back
                n = change()
                gone = self._over_bounds(size)
                if gone:
                    self._db.executemany("DELETE FROM lookups WHERE n = ?", [(g,) for g in gone])
        except sqlite3.Error as e:
            if self._failing != str(e):
                log.warning("history: cannot write to %s (%s); lookups are kept in memory meanwhile", self.path, e)
            self._failing = str(e)
            return False, None
        if self._failing is not None:
            log.info("history: writing to %s again", self.path)
            self._failing = None
        gone_set = set(gone)
        self._entries = deque(e for e in self._entries if e.n not in gone_set)
        for g in gone:
            self._sizes.pop(g, None)
        return True, n

    def _over_bounds(self, new_bytes: int | None) -> list[int]:
        """The oldest kept numbers to delete so that the entries (and one more of ``new_bytes``, unless None)
        fit in ``size`` entries and ``max_mb``; the newest entry always stays."""
        count = len(self._entries) + (new_bytes is not None)
        total = sum(self._sizes.values()) + (new_bytes or 0)
        gone = []
        for entry in self._entries:
            if count <= 1 or (count <= self.config.size and total <= self._max_bytes):
                break
            gone.append(entry.n)
            count -= 1
            total -= self._sizes.get(entry.n, 0)
        return gone

    # ---- reading ----------------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """The kept lookups, newest first."""
        with self._lock:
            return list(reversed(self._entries))

    def image(self, n: int) -> bytes | None:
        """The JPEG snapshot of lookup ``n``; None when it is gone or has none."""
        with self._lock:
            try:
                row = self._db.execute("SELECT snapshot FROM lookups WHERE n = ?", (n,)).fetchone()
            except sqlite3.Error as e:
                log.warning("history: cannot read lookup %d's snapshot (%s)", n, e)
                return None
        return bytes(row[0]) if row is not None and row[0] is not None else None

    def stored_bytes(self) -> int:
        """Bytes the kept entries take in the store (results + snapshots), what ``max_mb`` bounds."""
        with self._lock:
            return sum(self._sizes.values())

    def close(self) -> None:
        """Close the store (a clean stop folds the WAL back into the file; a kill does not need it)."""
        with self._lock:
            self._db.close()

    def to_csv(self) -> str:
        """The kept lookups as CSV (newest first), one row each; ``candidates`` is ``id:rank_score`` joined by
        spaces, ``items`` the ids of every item named in the frame (best first) joined by spaces."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for entry in self.entries():
            r, m = entry.result, entry.result.match
            top = m if m is not None else (r.results[0] if r.results else None)
            writer.writerow([
                entry.n, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.timestamp)), r.source,
                r.decision, _cell(m.id) if m else "", _cell(m.label) if m else "",
                "" if top is None or top.inliers is None else top.inliers,
                "" if top is None else top.to_json()["rank_score"], "" if top is None else round(top.score, 4),
                _cell(" ".join(f"{c.id}:{c.to_json()['rank_score']}" for c in r.results)),
                round(r.timings_ms.get("total", 0.0), 1), _cell(" ".join(c.id for c in r.matches))])
        return out.getvalue()


def _connect(path: Path | str) -> sqlite3.Connection:
    """Open (or create) the store and check its schema; sqlite3.DatabaseError when it is not one of ours."""
    db = sqlite3.connect(str(path), check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout = 2000")
        if path != ":memory:":
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # each commit reaches the disk: a power cut loses ≤ 1 entry
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"schema version {version}, this device reads {SCHEMA_VERSION}")
        if version == 0 or not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'lookups'").fetchone():
            with db:  # written only when new: a start on a full disk must still read the history
                db.execute(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("SELECT count(*) FROM lookups").fetchone()
        return db
    except sqlite3.DatabaseError:
        db.close()
        raise


def _cell(text: str) -> str:
    """A CSV cell that a spreadsheet shows as text: labels are typed by whoever enrols, and a cell starting with
    = + - @ would be run as a formula by Excel or LibreOffice."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text
