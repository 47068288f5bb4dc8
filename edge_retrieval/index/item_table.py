"""The compact item table of an index generation: ids, labels, sources, attributes and thumbnail spans of every entry
(one photo of an item: its key, edge_retrieval/core/photos.py) in one
memory-mapped file (``items.bin``), instead of a Python object per item. A 100k-item catalog as Python objects
(IndexedItem + an id → row dict) held ≈ 40 MB of the device's anonymous memory, 1M ≈ 400 MB; mapped, it holds
none, and a lookup touches the pages of the rows it shows and of one binary search.

Layout (little endian, every section 8-byte aligned)::

    offset 0   header 16 bytes: magic b"ITEM", version u32 (=2), count u32, reserved u32
    16         id_off     int64 [count + 1]   key of row i is text[id_off[i]:id_off[i+1]] (UTF-8)
    ...        label_off  int64 [count + 1]
    ...        source_off int64 [count + 1]   an empty source is None
    ...        attr_off   int64 [count + 1]   the item's attributes as a JSON object, empty = none (version 2)
    ...        thumbs     int64 [count, 2]    (offset, length) in thumbs.bin; offset -1 = no thumbnail
    ...        hashes     uint64 [count]      blake2b-64 of each key, sorted
    ...        order      int64 [count]       row of each sorted hash
    ...        item_hashes uint64 [count]     blake2b-64 of each row's item id, sorted (version 2)
    ...        item_order int64 [count]       row of each sorted item hash (version 2)
    ...        text       uint8 [...]         keys, then labels, then sources, then attributes

A version 1 table (no attributes, every key an item id) is still read: its keys are its item ids.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.core.photos import item_of

MAGIC = b"ITEM"
VERSION = 2
_HEADER = struct.Struct("<4sIII")


@dataclass(frozen=True)
class IndexedItem:
    """What the index knows about an entry (one photo of an item) besides its vector (in vector order): ``id`` is
    the entry key (edge_retrieval/core/photos.py), ``attributes`` the item's."""

    id: str
    label: str
    source: str | None
    attributes: dict[str, str] = field(default_factory=dict)


def id_hash(item_id: str) -> int:
    """The 64-bit hash the table is searched by (stable across processes and machines, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest(), "little")


def _offsets(texts: Sequence[bytes]) -> np.ndarray:
    off = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=off[1:])
    return off


def _text_damage(text: np.ndarray, offsets: tuple[np.ndarray, ...]) -> str | None:
    """Why the text section cannot be read as the ids, labels and sources (bad UTF-8, an offset inside a
    character), else None — checked once at open, in chunks, so that no later read of a row can fail."""
    decoder, chunk = codecs.getincrementaldecoder("utf-8")(), 1 << 20
    try:
        for start in range(0, len(text), chunk):
            decoder.decode(bytes(text[start:start + chunk]), final=start + chunk >= len(text))
    except UnicodeDecodeError as e:
        return f"the text is not UTF-8 ({e.reason} near byte {start + e.start})"
    for off in offsets:
        inside = off[off < len(text)]
        if len(inside) and ((text[inside] & 0xC0) == 0x80).any():
            return "a text offset falls inside a UTF-8 character"
    return None


class ItemTable:
    """Rows of keys / labels / sources / attributes / thumbnail spans, read from arrays (a mapped ``items.bin``, or
    the lists of an old generation's meta.json). Reads are thread-safe; nothing is decoded until asked for."""

    def __init__(self, offsets: tuple[np.ndarray, ...], thumbs: np.ndarray, hashes: np.ndarray, order: np.ndarray,
                 item_hashes: np.ndarray, item_order: np.ndarray, text: np.ndarray | bytes):
        """Use :meth:`open` or :meth:`build`. ``offsets``: keys, labels, sources, attributes."""
        self._id_off, self._label_off, self._source_off, self._attr_off = offsets
        self._thumbs, self._hashes, self._order, self._text = thumbs, hashes, order, text
        self._item_hashes, self._item_order = item_hashes, item_order
        self._item_count: int | None = None

    @classmethod
    def build(cls, ids: Sequence[str], labels: Sequence[str], sources: Sequence[str | None],
              thumbs: Sequence[tuple[int, int] | None], attributes: Sequence[dict[str, str]] | None = None) -> ItemTable:
        """A table in memory (what :meth:`write` stores; also how an old meta.json's item lists are read)."""
        attrs = [json.dumps(a, ensure_ascii=False, sort_keys=True) if a else "" for a in (attributes or [])]
        attrs += [""] * (len(ids) - len(attrs))
        parts = [[s.encode("utf-8") for s in ids], [s.encode("utf-8") for s in labels],
                 [(s or "").encode("utf-8") for s in sources], [a.encode("utf-8") for a in attrs]]
        base, offsets = 0, []
        for texts in parts:
            offsets.append(_offsets(texts) + base)
            base = int(offsets[-1][-1])
        spans = np.array([t if t is not None else (-1, 0) for t in thumbs], np.int64).reshape(-1, 2)
        hashes = np.array([id_hash(i) for i in ids], np.uint64)
        order = np.argsort(hashes, kind="stable").astype(np.int64)
        item_hashes = np.array([id_hash(item_of(i)) for i in ids], np.uint64)
        item_order = np.argsort(item_hashes, kind="stable").astype(np.int64)
        text = np.frombuffer(b"".join(b"".join(t) for t in parts), np.uint8)
        return cls(tuple(offsets), spans, hashes[order], order, item_hashes[item_order], item_order, text)

    def write(self, path: str | os.PathLike) -> None:
        """Write ``items.bin`` and fsync it (the caller writes into its temporary generation folder)."""
        n = len(self)
        try:
            with open(path, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, n, 0))
                for a in (self._id_off, self._label_off, self._source_off, self._attr_off, self._thumbs,
                          self._hashes, self._order, self._item_hashes, self._item_order):
                    f.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())
                f.write(bytes(self._text))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise CatalogIndexError(f"could not write the item table {path}: {e}") from e

    @classmethod
    def open(cls, path: str | os.PathLike, *, thumbs_size: int) -> ItemTable:
        """Map ``items.bin`` (version 1 or 2). CatalogIndexError naming the file when it is missing, truncated or
        corrupt (also when a thumbnail span points outside ``thumbs_size`` bytes of thumbs.bin)."""
        path = Path(path)

        def bad(why: str) -> CatalogIndexError:
            return CatalogIndexError(f"item table {path} is corrupt or truncated: {why}; rebuild the index")

        try:
            raw = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise CatalogIndexError(f"cannot map the item table {path}: {e}; rebuild the index") from None
        if len(raw) < _HEADER.size:
            raise bad(f"{len(raw)} bytes, shorter than the header")
        magic, version, n, _ = _HEADER.unpack(bytes(raw[:_HEADER.size]))
        if magic != MAGIC or version not in (1, VERSION):
            raise bad(f"magic {magic!r} version {version}, expected {MAGIC!r} {VERSION}")
        n_text = 3 if version == 1 else 4
        sizes = [(np.int64, n + 1)] * n_text + [(np.int64, 2 * n), (np.uint64, n), (np.int64, n)]
        sizes += [(np.uint64, n), (np.int64, n)] if version > 1 else []
        arrays, pos = [], _HEADER.size
        for dtype, count in sizes:
            end = pos + 8 * count
            if end > len(raw):
                raise bad(f"{len(raw)} bytes cannot hold the tables of {n} items")
            arrays.append(np.asarray(raw[pos:end]).view(np.dtype(dtype).newbyteorder("<")))
            pos = end
        offs = tuple(arrays[:n_text])
        thumbs, hashes, order = arrays[n_text:n_text + 3]
        item_hashes, item_order = arrays[n_text + 3:] if version > 1 else (hashes, order)  # v1: keys are items
        if version == 1:
            offs += (np.full(n + 1, offs[-1][-1], np.int64),)  # no attributes: every span empty, at the end
        text = raw[pos:]
        # Checked section by section, not on concatenated copies: at 1M items those were ~50 MB of temporaries.
        if (offs[0][0] != 0 or offs[-1][-1] != len(text) or any((o[1:] < o[:-1]).any() for o in offs)
                or any(b[0] < a[-1] for a, b in zip(offs, offs[1:]))):
            raise bad("text offsets are not monotonic from 0 to the end of the file")
        thumbs = thumbs.reshape(n, 2)
        has = thumbs[:, 0] >= 0
        if n and (((thumbs[:, 1] < 0) & has).any() or ((thumbs[:, 0] + thumbs[:, 1] > thumbs_size) & has).any()):
            raise bad(f"a thumbnail span points outside thumbs.bin ({thumbs_size} bytes)")
        if n and any(((o < 0) | (o >= n)).any() for o in (order, item_order)):
            raise bad("the id search order has rows out of range")
        if (why := _text_damage(text, offs)) is not None:
            raise bad(why)
        return cls(offs, thumbs, hashes, order, item_hashes, item_order, text)

    def __len__(self) -> int:
        return len(self._id_off) - 1

    def _text_at(self, off: np.ndarray, row: int) -> str:
        return bytes(self._text[int(off[row]):int(off[row + 1])]).decode("utf-8")

    def id(self, row: int) -> str:
        """The key of ``row`` (its item id, or ``<item id>#<photo>``)."""
        return self._text_at(self._id_off, row)

    def label(self, row: int) -> str:
        """The label of ``row``."""
        return self._text_at(self._label_off, row)

    def attributes(self, row: int) -> dict[str, str]:
        """The item attributes of ``row`` ({} when none)."""
        text = self._text_at(self._attr_off, row)
        try:
            return json.loads(text) if text else {}
        except ValueError:  # checked UTF-8 at open, but not the JSON: a damaged row shows no attributes
            return {}

    def item(self, row: int) -> IndexedItem:
        """key / label / source / attributes of ``row``."""
        return IndexedItem(self.id(row), self.label(row), self._text_at(self._source_off, row) or None,
                           self.attributes(row))

    def thumb_span(self, row: int) -> tuple[int, int] | None:
        """(offset, length) of the thumbnail of ``row`` in thumbs.bin, None when it has none."""
        off, length = (int(v) for v in self._thumbs[row])
        return None if off < 0 else (off, length)

    def row(self, item_id: str) -> int | None:
        """The row of the key ``item_id``, None when it is not in the table (binary search on the key hashes)."""
        h = np.uint64(id_hash(item_id))
        i = int(np.searchsorted(self._hashes, h))
        while i < len(self._hashes) and self._hashes[i] == h:  # equal hashes: compare the ids themselves
            if self.id(int(self._order[i])) == item_id:
                return int(self._order[i])
            i += 1
        return None

    def photo_rows(self, item_id: str) -> list[int]:
        """The rows of every photo of item ``item_id`` (in row order; [] when it has none here)."""
        h = np.uint64(id_hash(item_id))
        lo, hi = (int(np.searchsorted(self._item_hashes, h, side=side)) for side in ("left", "right"))
        return sorted(r for r in (int(self._item_order[i]) for i in range(lo, hi)) if item_of(self.id(r)) == item_id)

    @property
    def item_count(self) -> int:
        """How many items the rows are photos of (distinct item ids; hashes that collide count once — 1 in 2^64)."""
        if self._item_count is None:
            h = np.asarray(self._item_hashes)
            self._item_count = int(len(h) > 0) + int(np.count_nonzero(h[1:] != h[:-1]))
        return self._item_count
