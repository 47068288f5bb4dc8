"""What names a catalog item: the one id rule, the label rule, and labels files (CSV/TSV/JSON of id → label).
An id is also a relative path under the store's folders, so the rule keeps it a legal, visible file name."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import unicodedata
from pathlib import Path

from edge_retrieval.core.errors import CatalogIndexError, InputError

MAX_ID_CHARS = 200
MAX_ID_PART_BYTES = 120  # a part becomes a file name under enrolled_dir: ext4 allows 255 bytes
MAX_LABEL_CHARS = 200
_ID_PART_RE = re.compile(r"\w[\w.\- ]*")  # fullmatch: "$" also matches before a final newline
ID_RULE = (f"an id is up to {MAX_ID_CHARS} characters in parts separated by '/'; each part starts with a letter, "
           f"digit or '_', then letters, digits, '_', '-', '.' or spaces, at most {MAX_ID_PART_BYTES} bytes in UTF-8 "
           "(no empty parts, no leading '.', no '..')")


def validate_id(item_id: str) -> str:
    """Check a catalog id against the one id rule (``ID_RULE``); it is also a relative path under
    ``enrolled_dir``, so it must stay inside it and be a legal, visible file name. Raises InputError (400)."""
    parts = item_id.split("/") if isinstance(item_id, str) else [""]
    if (not isinstance(item_id, str) or len(item_id) > MAX_ID_CHARS or item_id != item_id.strip()
            or any(not _ID_PART_RE.fullmatch(p) or len(p.encode("utf-8")) > MAX_ID_PART_BYTES for p in parts)):
        raise InputError(f"invalid catalog id {item_id!r}: {ID_RULE}")
    return item_id


_NOT_IN_RULE = re.compile(r"[^\w.\- ]+")


def path_stem(rel_path: str) -> str:
    """A catalog file's relative path without its extension (``shelf/Mug (2).jpg`` → ``shelf/Mug (2)``)."""
    return rel_path.rsplit(".", 1)[0] if "." in rel_path.rsplit("/", 1)[-1] else rel_path


def id_from_path(rel_path: str) -> str:
    """The item id of a catalog file from the name a user gave it: its path relative to the catalog folder without
    the extension, each part made to fit the id rule — Unicode NFC (an accent typed two ways is one id), each run
    of characters the rule does not allow (brackets, commas, quotes, '#', …) one '_', a part that does not start
    with a letter, digit or '_' prefixed with '_', spaces around parts trimmed, an over-long part cut with a short
    hash of the whole so two long names stay two ids. A name that already fits the rule is its id unchanged."""
    stem = path_stem(rel_path)
    parts = []
    for raw in unicodedata.normalize("NFC", stem).split("/"):
        part = _NOT_IN_RULE.sub("_", raw).strip() or "_"
        if not re.match(r"\w", part):
            part = "_" + part
        if len(part.encode("utf-8")) > MAX_ID_PART_BYTES:
            digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
            part = part.encode("utf-8")[:MAX_ID_PART_BYTES - 9].decode("utf-8", "ignore").rstrip() + "-" + digest
        parts.append(part)
    item_id = "/".join(parts)
    if len(item_id) > MAX_ID_CHARS:
        item_id = item_id[:MAX_ID_CHARS - 9].rstrip(" /") + "-" + hashlib.sha1(stem.encode("utf-8")).hexdigest()[:8]
    return validate_id(item_id)


def validate_label(label: str) -> str:
    """Labels are shown on the page and in events: 1–MAX_LABEL_CHARS printable characters. Raises InputError."""
    label = label.strip()
    if not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise InputError(f"invalid label ({len(label)} characters): a label is at most {MAX_LABEL_CHARS} printable "
                         "characters, and not empty")
    return label


def load_labels(path: str | Path | None) -> dict[str, str]:
    """id → label from a JSON object, or a CSV/TSV with columns id,label (header optional)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CatalogIndexError(f"{path}: cannot read labels ({e.strerror or e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CatalogIndexError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CatalogIndexError(f"{path}: labels JSON must be an object of id → label")
        return {str(k): str(v) for k, v in data.items()}
    delim = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.splitlines()[0] else ","
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delim) if r]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["id", "label"]:
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise CatalogIndexError(f"{path}: line {bad[0]} needs two columns: id{delim!r}label")
    return {r[0].strip(): r[1].strip() for r in rows}
