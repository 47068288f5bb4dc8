"""Which catalog-store change the live index has taken, its delta included: ``store-mark.json`` in the index folder,
written as changes are applied. A base generation claims the store only when a merge writes it; this mark claims it
from the first change on, so a lost, emptied or older store beside the index is noticed at start
(edge_retrieval/catalog/store.py ``derived_from``) even before any merge."""
from __future__ import annotations

import json
import os
from pathlib import Path

from edge_retrieval.index.generation import fsync_dir

MARK_FILE = "store-mark.json"
FORMAT_VERSION = 1


def read_store_mark(index_path: str | os.PathLike) -> tuple[str, int] | None:
    """(store id, seq) the index folder last recorded; None when there is none or it cannot be read (a damaged
    mark only loses this extra check: the base generation's own claim still holds)."""
    try:
        doc = json.loads((Path(index_path) / MARK_FILE).read_text(encoding="utf-8"))
        if doc.get("format_version") == FORMAT_VERSION:
            return str(doc["store_id"]), int(doc["seq"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def write_store_mark(index_path: str | os.PathLike, store_id: str, seq: int) -> None:
    """Record (atomically, durably) that the index holds ``store_id`` up to ``seq``. OSError when it cannot."""
    folder = Path(index_path)
    tmp = folder / f".{MARK_FILE}.tmp{os.getpid()}"
    data = json.dumps({"format_version": FORMAT_VERSION, "store_id": store_id, "seq": seq}).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MARK_FILE)
        fsync_dir(folder)  # the new name survives a power cut too
    finally:
        tmp.unlink(missing_ok=True)


def newest_claim(base: tuple[str, int] | None, mark: tuple[str, int] | None) -> tuple[str, int] | None:
    """What the index claims of the store: the mark, unless the base generation claims a later change of the same
    store (a merge or an ``index build`` wrote it after the mark)."""
    if mark is None:
        return base
    if base is not None and base[0] == mark[0] and base[1] > mark[1]:
        return base
    return mark
