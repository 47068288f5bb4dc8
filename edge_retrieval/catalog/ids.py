"""What names a catalog item: the one id rule, the label rule, the photo-name rule, the attributes rule, which
item and photo a catalog file is, and labels files (CSV/TSV/JSON of id → label, extra columns → attributes).
An id is also a relative path under the store's folders, so the rule keeps it a legal, visible file name."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import unicodedata
from pathlib import Path

from edge_retrieval.core.errors import CatalogIndexError, InputError
from edge_retrieval.core.photos import split_key

MAX_ID_CHARS = 200
MAX_ID_PART_BYTES = 120  # a part becomes a file name under enrolled_dir: ext4 allows 255 bytes
MAX_LABEL_CHARS = 200
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_CHARS = 1024
MAX_ATTRIBUTES_BYTES = 16 * 1024  # the whole object as JSON: it travels with every match, event and history entry
_ID_PART_RE = re.compile(r"\w[\w.\- ]*")  # fullmatch: "$" also matches before a final newline
ID_RULE = (f"an id is up to {MAX_ID_CHARS} characters in parts separated by '/'; each part starts with a letter, "
           f"digit or '_', then letters, digits, '_', '-', '.' or spaces, at most {MAX_ID_PART_BYTES} bytes in UTF-8 "
           "(no empty parts, no leading '.', no '..')")


def _is_part(part: str) -> bool:
    """Whether ``part`` is one part of an id as the rule has it (a photo's name is one too)."""
    return bool(_ID_PART_RE.fullmatch(part)) and len(part.encode("utf-8")) <= MAX_ID_PART_BYTES


def validate_id(item_id: str) -> str:
    """Check a catalog id against the one id rule (``ID_RULE``); it is also a relative path under
    ``enrolled_dir``, so it must stay inside it and be a legal, visible file name. Raises InputError (400)."""
    parts = item_id.split("/") if isinstance(item_id, str) else [""]
    if (not isinstance(item_id, str) or len(item_id) > MAX_ID_CHARS or item_id != item_id.strip()
            or not all(_is_part(p) for p in parts)):
        raise InputError(f"invalid catalog id {item_id!r}: {ID_RULE}")
    return item_id


def validate_key(key: str) -> str:
    """Check an entry key (edge_retrieval/core/photos.py): its item id against the id rule, its photo name (if any)
    against one part of it. Raises InputError (400)."""
    item_id, photo = split_key(key)
    validate_id(item_id)
    if photo and not _is_part(photo):  # the part pattern has no '/': a photo name is never a path
        raise InputError(f"invalid photo name {photo!r}: one part of the id rule ({ID_RULE})")
    return key


_NOT_IN_RULE = re.compile(r"[^\w.\- ]+")


def path_stem(rel_path: str) -> str:
    """A catalog file's relative path without its extension (``shelf/Mug (2).jpg`` → ``shelf/Mug (2)``)."""
    return rel_path.rsplit(".", 1)[0] if "." in rel_path.rsplit("/", 1)[-1] else rel_path


def id_from_path(rel_path: str) -> str:
    """The item id of a catalog file from the name a user gave it: its path relative to the catalog folder without
    the extension (``id_from_name``)."""
    return id_from_name(path_stem(rel_path))


def photo_name(file_name: str) -> str:
    """The name of a photo in an item folder (``Side view (2).jpg`` → ``Side view _2_``): the file's stem made to
    fit one part of the id rule (``id_from_name``). Raises InputError."""
    return id_from_name(path_stem(file_name).replace("/", "_"))


def item_and_photo(rel_path: str) -> tuple[str, str]:
    """(item id, photo name) of a catalog file: a file directly in the catalog folder is an item of one photo
    (``Mug.jpg`` → ``("Mug", "")``); a file in a sub-folder is a photo of the item the folder names
    (``shelf/Mug/front.jpg`` → ``("shelf/Mug", "front")``). Raises InputError."""
    folder, _, name = rel_path.rpartition("/")
    return (id_from_path(rel_path), "") if not folder else (id_from_name(folder), photo_name(name))


def id_from_name(stem: str) -> str:
    """An item id from a name a user gave (a file's stem, or a folder's path), each part made to fit the id rule:
    Unicode NFC (an accent typed two ways is one id), each run of characters the rule does not allow (brackets,
    commas, quotes, '#', …) one '_', a part that does not start with a letter, digit or '_' prefixed with '_',
    spaces around parts trimmed, an over-long part cut with a short hash of the whole so two long names stay two
    ids. A name that already fits the rule is its id unchanged."""
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


def validate_attributes(attributes: object) -> dict[str, str]:
    """Attributes as the catalog keeps them: an object of at most MAX_ATTRIBUTES keys of 1–MAX_ATTRIBUTE_CHARS
    characters, values strings (a number or true/false becomes its text) of at most MAX_ATTRIBUTE_CHARS, the
    whole at most MAX_ATTRIBUTES_BYTES as JSON. Raises InputError (400) saying which limit."""
    if not isinstance(attributes, dict) or len(attributes) > MAX_ATTRIBUTES:
        raise InputError(f"attributes must be an object of at most {MAX_ATTRIBUTES} keys")
    out: dict[str, str] = {}
    for k, v in attributes.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (int, float)):
            v = str(v)
        if not isinstance(k, str) or not isinstance(v, str) or not k.strip() or len(k) > MAX_ATTRIBUTE_CHARS \
                or len(v) > MAX_ATTRIBUTE_CHARS:
            raise InputError(f"attribute {str(k)[:40]!r}: keys and values are strings (or numbers) of up to "
                             f"{MAX_ATTRIBUTE_CHARS} characters, keys not empty")
        out[k.strip()] = v
    if len(json.dumps(out, ensure_ascii=False).encode("utf-8")) > MAX_ATTRIBUTES_BYTES:
        raise InputError(f"attributes are over {MAX_ATTRIBUTES_BYTES // 1024} KB as JSON; keep them short (a sku, a "
                         "price, a link), not documents")
    return out


def load_labels(path: str | Path | None) -> dict[str, str]:
    """id → label from a labels file (``load_labels_file``)."""
    return load_labels_file(path)[0]


def load_labels_file(path: str | Path | None) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(id → label, id → attributes) from a JSON object (id → label, or id → {"label": …, other keys: attributes}),
    or a CSV/TSV with columns id,label (header optional) and, under a header, more columns (sku, price, url, …)
    that become the attributes of each row (empty cells left out). CatalogIndexError names the file, line and
    what is wrong."""
    if path is None:
        return {}, {}
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
        labels, attrs = {}, {}
        for k, v in data.items():
            if isinstance(v, dict):
                extra = {a: b for a, b in v.items() if a != "label"}
                labels[str(k)] = str(v.get("label", k))
                attrs[str(k)] = _attributes_of(path, f"item {str(k)[:40]!r}", extra)
            else:
                labels[str(k)] = str(v)
        return labels, {k: a for k, a in attrs.items() if a}
    delim = "\t" if path.suffix.lower() == ".tsv" or (text and "\t" in text.splitlines()[0]) else ","
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(text.splitlines(), delimiter=delim)) if r]
    header = None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["id", "label"]:
        header, rows = [c.strip() for c in rows[0][1]], rows[1:]
    bad = [line for line, r in rows if len(r) < 2]
    if bad:
        raise CatalogIndexError(f"{path}: line {bad[0]} needs two columns: id{delim!r}label")
    wide = [line for line, r in rows if len(r) > 2 and (header is None or len(r) > len(header))]
    if wide:
        raise CatalogIndexError(f"{path}: line {wide[0]} has more columns than " + (
            "the header names" if header else "id and label; a file with more columns (sku, price, …) needs a "
            f"header line naming them: id{delim}label{delim}sku{delim}…"))
    labels = {r[0].strip(): r[1].strip() for _, r in rows}
    attrs = {}
    for line, r in rows:
        if header is not None and len(r) > 2:
            extra = {name: cell.strip() for name, cell in zip(header[2:], r[2:]) if cell.strip()}
            if extra:
                attrs[r[0].strip()] = _attributes_of(path, f"line {line}", extra)
    return labels, attrs


def _attributes_of(path: Path, where: str, extra: dict) -> dict[str, str]:
    try:
        return validate_attributes(extra)
    except InputError as e:
        raise CatalogIndexError(f"{path}: {where}: {e}") from None
