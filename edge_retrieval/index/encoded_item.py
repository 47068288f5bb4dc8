"""One encoded catalog item as bytes: what an enrolment keeps beside its original in the catalog store, so that
the delta (edge_retrieval/index/delta.py) is rebuilt after a restart without running the model again, and a
merge writes it into the next generation as it was encoded. Little endian::

    magic b"ERIT", version u16 (=2; 1 is still read), crc32 u32 of everything after this 10-byte header
    bundle sha256 (64 ASCII hex), id, label, source (u16 length + UTF-8 each; source length 0xFFFF = none)
    views u16, dim u32, vectors float16 [views, dim]   (L2-normalised, as vectors.npy keeps them)
    keypoints i32 (-1 = no features), width u32, height u32, xy float32 [n, 2], desc uint8 [n, 32]
    thumbnail u32 length (0xFFFFFFFF = none) + JPEG bytes
    attributes u32 length + a UTF-8 JSON object (version 2; 0 = none)

A damaged or foreign blob is refused with CatalogIndexError (the caller re-encodes the store's original).
"""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.index.generation import item_vectors
from edge_retrieval.index.reader import CatalogItem
from edge_retrieval.model.local_features import DESC_BYTES, Features

MAGIC = b"ERIT"
VERSION = 2
_HEAD = struct.Struct("<4sHI")
_NO_SOURCE = 0xFFFF
_NO_THUMB = 0xFFFFFFFF


def _text(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) >= _NO_SOURCE:
        raise CatalogIndexError(f"catalog item text of {len(b)} bytes is too long to keep")
    return struct.pack("<H", len(b)) + b


def encode_item(item: CatalogItem, bundle_sha256: str) -> bytes:
    """``item`` (its vectors L2-normalised to float16, features, thumbnail) as bytes for the store."""
    v = item_vectors(0, item.id, item.vector, item.thumbnail_jpeg, None)
    parts = [bundle_sha256.encode("ascii").ljust(64)[:64], _text(item.id), _text(item.label),
             _text(item.source) if item.source is not None else struct.pack("<H", _NO_SOURCE),
             struct.pack("<HI", *v.shape), v.astype("<f2").tobytes()]
    f = item.features
    if f is None:
        parts.append(struct.pack("<iII", -1, 0, 0))
    else:
        parts += [struct.pack("<iII", len(f), int(f.size_wh[0]), int(f.size_wh[1])),
                  np.ascontiguousarray(f.xy, "<f4").tobytes(), np.ascontiguousarray(f.desc, np.uint8).tobytes()]
    thumb = item.thumbnail_jpeg
    parts.append(struct.pack("<I", _NO_THUMB) if thumb is None else struct.pack("<I", len(thumb)) + bytes(thumb))
    attrs = json.dumps(item.attributes, ensure_ascii=False, sort_keys=True).encode("utf-8") if item.attributes else b""
    parts.append(struct.pack("<I", len(attrs)) + attrs)
    body = b"".join(parts)
    return _HEAD.pack(MAGIC, VERSION, zlib.crc32(body)) + body


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.data):
            raise CatalogIndexError("encoded catalog item is cut short")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def text(self) -> str | None:
        (n,) = self.unpack("<H")
        return None if n == _NO_SOURCE else bytes(self.take(n)).decode("utf-8")


def decode_item(data: bytes, bundle_sha256: str) -> CatalogItem:
    """The item kept by :func:`encode_item`; CatalogIndexError when the bytes are damaged (checksum, lengths) or
    were encoded with another bundle."""
    if len(data) < _HEAD.size:
        raise CatalogIndexError("encoded catalog item is cut short")
    magic, version, crc = _HEAD.unpack_from(data)
    if magic != MAGIC or version not in (1, VERSION):
        raise CatalogIndexError(f"encoded catalog item: not format {MAGIC!r} v{VERSION}")
    if zlib.crc32(memoryview(data)[_HEAD.size:]) != crc:
        raise CatalogIndexError("encoded catalog item: checksum mismatch (damaged)")
    r = _Reader(data)
    r.take(_HEAD.size)
    sha = bytes(r.take(64)).decode("ascii", errors="replace").strip()
    if sha != bundle_sha256:
        raise CatalogIndexError(f"encoded catalog item was made with bundle {sha[:12]}…, not {bundle_sha256[:12]}…")
    try:
        item_id, label, source = r.text(), r.text(), r.text()
    except UnicodeDecodeError:
        raise CatalogIndexError("encoded catalog item: text is not UTF-8") from None
    views, dim = r.unpack("<HI")
    vector = np.frombuffer(r.take(2 * views * dim), "<f2").reshape(views, dim).astype(np.float32)
    n, w, h = r.unpack("<iII")
    features = None
    if n >= 0:
        xy = np.frombuffer(r.take(8 * n), "<f4").reshape(n, 2).copy()
        desc = np.frombuffer(r.take(DESC_BYTES * n), np.uint8).reshape(n, DESC_BYTES).copy()
        features = Features(xy, desc, (w, h))
    (tn,) = r.unpack("<I")
    thumb = None if tn == _NO_THUMB else bytes(r.take(tn))
    attributes: dict[str, str] = {}
    if version > 1 and (an := r.unpack("<I")[0]):
        try:
            attributes = json.loads(bytes(r.take(an)).decode("utf-8"))
        except ValueError:
            raise CatalogIndexError("encoded catalog item: its attributes are not a UTF-8 JSON object") from None
    if item_id is None or label is None or not isinstance(attributes, dict):
        raise CatalogIndexError("encoded catalog item has no id or label")
    return CatalogItem(item_id, label, vector, thumb, source, features, attributes)
