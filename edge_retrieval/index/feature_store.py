"""``features.bin``: the ORB features (edge_retrieval/model/local_features.py) of every catalog item of an index generation in one
memory-mapped file, written as items arrive (``FeatureWriter``) and mapped to read (``FeatureStore``)::

    offset 0   header, 16 bytes, little endian: magic b"ORBF", version u32 (=1), count u32, desc_bytes u32 (=32)
    16         offsets     int64  [count + 1]   row of item i is offsets[i] .. offsets[i+1]; offsets[0] = 0
    ...        size_wh     int32  [count, 2]    (width, height) of the downscaled image the xy refer to
    ...        xy          float32 [total, 2]   keypoint coordinates, total = offsets[count]
    ...        desc        uint8  [total, 32]   ORB descriptors
    file size = 16 + 8 * (count + 1) + 8 * count + 40 * total  (every section stays 8-byte aligned)

Bytes per item: 16 + 40 per keypoint, i.e. ≈ 20 KB at 500 features (≈ 2 GB for a 100k-item catalog, which
is why it is mapped, not read). Only the candidates' pages are touched per query.
"""
from __future__ import annotations

import os
import shutil
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_retrieval.core.errors import CatalogIndexError
from edge_retrieval.model.local_features import DESC_BYTES, Features

MAGIC = b"ORBF"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sIII")


def _layout(count: int, total: int) -> tuple[int, int, int, int, int]:
    """Byte offsets of (offsets, size_wh, xy, desc) and the file size."""
    off = _HEADER.size
    size = off + 8 * (count + 1)
    xy = size + 8 * count
    desc = xy + 8 * total
    return off, size, xy, desc, desc + DESC_BYTES * total


class FeatureWriter:
    """Writes ``features.bin`` one item at a time, in bounded memory: the keypoints go to two side files as they
    arrive (16 bytes per item stay in memory), and :meth:`finish` puts the tables and both side files together."""

    def __init__(self, path: str | os.PathLike):
        """Start writing ``path`` (in the caller's temporary generation folder)."""
        self.path = Path(path)
        self._counts, self._size_wh = array("q"), array("i")
        try:
            self._xy = open(self.path.with_name(f".{self.path.name}.xy"), "wb")
            self._desc = open(self.path.with_name(f".{self.path.name}.desc"), "wb")
        except OSError as e:
            raise CatalogIndexError(f"could not write the features file {self.path}: {e}") from e

    def add(self, f: Features) -> None:
        """The features of the next item (row = items added before it)."""
        n = len(f)
        if f.xy.shape != (n, 2) or f.desc.shape != (n, DESC_BYTES):
            raise CatalogIndexError(f"features of item #{len(self._counts)} have shapes xy {f.xy.shape}, "
                                    f"desc {f.desc.shape}; expected [N, 2] and [N, {DESC_BYTES}]")
        try:
            self._xy.write(np.ascontiguousarray(f.xy, "<f4").tobytes())
            self._desc.write(np.ascontiguousarray(f.desc, np.uint8).tobytes())
        except OSError as e:
            raise CatalogIndexError(f"could not write the features file {self.path}: {e}") from e
        self._counts.append(n)
        self._size_wh.extend((int(f.size_wh[0]), int(f.size_wh[1])))

    def finish(self) -> int:
        """Write the file, fsync it, drop the side files; returns its size in bytes."""
        offsets = np.zeros(len(self._counts) + 1, "<i8")
        np.cumsum(np.frombuffer(self._counts, np.int64), out=offsets[1:])
        try:
            with open(self.path, "wb") as fh:
                fh.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(self._counts), DESC_BYTES))
                fh.write(offsets.tobytes())
                fh.write(np.frombuffer(self._size_wh, np.int32).astype("<i4").tobytes())
                for side in (self._xy, self._desc):
                    side.close()
                    with open(side.name, "rb") as src:
                        shutil.copyfileobj(src, fh, 1 << 20)
                fh.flush()
                os.fsync(fh.fileno())
                return fh.tell()
        except OSError as e:
            raise CatalogIndexError(f"could not write the features file {self.path}: {e}") from e
        finally:
            self.close()

    def close(self) -> None:
        """Drop the side files (after :meth:`finish`, or when the build is abandoned)."""
        for side in (self._xy, self._desc):
            side.close()
            Path(side.name).unlink(missing_ok=True)


class FeatureStore:
    """All catalog items' Features in one memory-mapped file (format in the module docstring).

    ``get(row)`` returns views into the mapping (no copy); they stay valid after ``close()`` because they
    hold the mapping themselves. Reads are thread-safe.
    """

    def __init__(self, path: Path, raw: np.ndarray, offsets: np.ndarray, size_wh: np.ndarray,
                 xy: np.ndarray, desc: np.ndarray):
        """Use :meth:`open`; this constructor takes already-validated parts."""
        self.path = path
        self._raw: np.ndarray | None = raw
        self._offsets, self._size_wh, self._xy, self._desc = offsets, size_wh, xy, desc

    @staticmethod
    def write(path: str | os.PathLike, features: Sequence[Features]) -> int:
        """Write ``features`` (row i = catalog item i) to ``path`` and fsync it; returns the bytes written."""
        writer = FeatureWriter(path)
        try:
            for f in features:
                writer.add(f)
        except BaseException:
            writer.close()
            raise
        return writer.finish()

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Map the features file at ``path``. Raises CatalogIndexError naming the file when it is missing,
        truncated or corrupt (bad magic/version, sizes not matching its length, offsets not monotonic)."""
        path = Path(path)
        try:
            length = path.stat().st_size
            raw = np.memmap(path, dtype=np.uint8, mode="r") if length else np.zeros(0, np.uint8)
        except (OSError, ValueError) as e:
            raise CatalogIndexError(f"cannot map the features file {path}: {e}") from None

        def bad(why: str) -> CatalogIndexError:
            return CatalogIndexError(f"features file {path} is corrupt or truncated: {why}; rebuild the index")

        if length < _HEADER.size:
            raise bad(f"{length} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, count, desc_bytes = _HEADER.unpack(bytes(raw[:_HEADER.size]))
        if magic != MAGIC:
            raise bad(f"magic {magic!r}, expected {MAGIC!r}")
        if version != FORMAT_VERSION or desc_bytes != DESC_BYTES:
            raise bad(f"version {version} / desc_bytes {desc_bytes}, expected {FORMAT_VERSION} / {DESC_BYTES}")
        o_off, o_size, _, _, _ = _layout(count, 0)
        if length < o_size + 8 * count:
            raise bad(f"{length} bytes cannot hold the tables of {count} items")
        offsets = np.asarray(raw[o_off:o_size]).view("<i8")
        if offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise bad("item offsets are not monotonic from 0")
        total = int(offsets[-1])
        _, s_off, xy_off, d_off, end = _layout(count, total)
        if length != end:
            raise bad(f"{length} bytes, but {count} items with {total} keypoints need {end}")
        size_wh = np.asarray(raw[s_off:xy_off]).view("<i4").reshape(count, 2)
        xy = np.asarray(raw[xy_off:d_off]).view("<f4").reshape(total, 2)
        desc = np.asarray(raw[d_off:end]).reshape(total, DESC_BYTES)
        return cls(path, raw, offsets, size_wh, xy, desc)

    def __len__(self) -> int:
        return int(self._size_wh.shape[0])

    def get(self, row: int) -> Features:
        """Features of catalog item ``row`` (views into the mapping)."""
        if self._raw is None:
            raise CatalogIndexError(f"features file {self.path} is closed")
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} items in {self.path}")
        a, b = int(self._offsets[row]), int(self._offsets[row + 1])
        w, h = self._size_wh[row]
        return Features(self._xy[a:b], self._desc[a:b], (int(w), int(h)))

    def close(self) -> None:
        """Drop this store's reference to the mapping (views handed out keep it alive until released)."""
        self._raw = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
