"""A catalog archive: one tar file with every item of a catalog (id, label, attributes, its original photos, byte for
byte) and where the store stood — a backup, a restore, and the way to move a catalog to another device. Written
by ``catalog export``, read by ``catalog import``. The archive holds originals, never descriptors, so a device
with another bundle imports it too (it encodes the photos with its own).

Layout (uncompressed tar: the photos are compressed already), members in this order::

    manifest.json      {"format": "edge-retrieval-catalog", "version": 1, "store": {"id", "seq"}, "exported",
                        "items": [{"id", "label", "attributes", "photos": [{"photo", "file", "bytes", "sha256"}]}]}
                       (an item's first photo is "photo": "", the others by their names)
    photos/NNNNNNN.<ext>   one file per photo, named by its row

An import validates the whole archive (manifest, every photo's size, hash and decode, ids, labels, attributes)
before it writes anything, then commits every item to the store in ONE transaction: all or nothing."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge_retrieval.catalog.ids import validate_attributes, validate_id, validate_key, validate_label
from edge_retrieval.catalog.store import CatalogStore
from edge_retrieval.core.config import ImagesConfig
from edge_retrieval.core.errors import CatalogIndexError, InputError
from edge_retrieval.core.photos import item_of, photo_key, split_key
from edge_retrieval.imaging.codec import decode_image
from edge_retrieval.index.generation import fsync_dir

FORMAT = "edge-retrieval-catalog"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 512 * 1024 * 1024  # 1M items at ~300 bytes each, with room
_SUFFIXES = {b"\xff\xd8": ".jpg", b"\x89P": ".png", b"GI": ".gif", b"BM": ".bmp", b"RI": ".webp"}


@dataclass(frozen=True)
class ArchivedItem:
    """One item of an archive: what the catalog holds of it, without the photo bytes."""

    id: str
    label: str
    attributes: dict[str, str] = field(default_factory=dict)
    photos: tuple[dict, ...] = ()


@dataclass
class ArchiveReport:
    """What an export or an import did."""

    items: int = 0
    photos: int = 0
    bytes: int = 0
    replaced: list[str] = field(default_factory=list)
    store_seq: int = 0  # the exporting store's seq (export) / the importing store's seq after it (import)


def export_catalog(store: CatalogStore, index_items: list, out: str | os.PathLike) -> ArchiveReport:
    """Write the catalog as it stands — the live index's items with the store's newer changes on top (an
    enrolment's original from the store, a catalog-folder item's from its file) — to ``out``, atomically (a
    temporary file renamed at the end). Raises CatalogIndexError naming an item whose original is gone."""
    out = Path(out)
    rows = {r.id: r for r in store.summary()}  # entry key → its latest change, without the original
    seq = store.seq()
    # entry key → (label, attributes, where its photo is: the store's key or a file path)
    entries: dict[str, tuple[str, dict, object]] = {}
    for it in index_items:
        if it.id not in rows:
            entries[it.id] = (it.label, it.attributes, Path(it.source) if it.source else None)
    for key, r in rows.items():
        if not r.removed:
            entries[key] = (r.label or item_of(key).rsplit("/", 1)[-1], r.attributes, key)
    items: dict[str, list[str]] = {}
    for key in sorted(entries, key=lambda k: split_key(k)):  # an item's first photo ("") first
        items.setdefault(item_of(key), []).append(key)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    rep = ArchiveReport(store_seq=seq)
    manifest_items = []
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            photos, row = [], 0
            for item_id, keys in sorted(items.items()):
                label, attributes, _ = entries[keys[0]]
                listed = []
                for key in keys:
                    data = _original(store, key, entries[key][2])
                    name = f"photos/{row:07d}{_SUFFIXES.get(data[:2], '.img')}"
                    row += 1
                    photos.append((name, data))
                    listed.append({"photo": split_key(key)[1], "file": name, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()})
                manifest_items.append({"id": item_id, "label": label, "attributes": attributes, "photos": listed})
            manifest = json.dumps({"format": FORMAT, "version": VERSION, "store": {"id": store.id, "seq": seq},
                                   "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "items": manifest_items}, ensure_ascii=False).encode("utf-8")
            _add(tar, MANIFEST, manifest)
            for name, data in photos:
                _add(tar, name, data)
                rep.photos += 1
                rep.bytes += len(data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise CatalogIndexError(f"{out}: cannot write the archive ({e.strerror or e}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    rep.items = len(manifest_items)
    return rep


def _original(store: CatalogStore, item_id: str, where: object) -> bytes:
    if isinstance(where, Path):
        try:
            return where.read_bytes()
        except OSError as e:
            raise CatalogIndexError(f"item {item_id!r}: its original {where} cannot be read ({e.strerror or e}); "
                                    "nothing was written") from None
    row = store.get(item_id)
    if row is None or row.image is None:
        raise CatalogIndexError(f"item {item_id!r}: the store has no original for it; nothing was written")
    return row.image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def read_archive(path: str | os.PathLike, images: ImagesConfig = ImagesConfig()) -> list[ArchivedItem]:
    """Read and check a whole archive without writing anything: the manifest's format and version, every item's
    id, label and attributes, every photo present with its size and sha256, and decodable within ``images``
    limits. Raises InputError naming what is wrong (a truncated file, a photo that does not match, …)."""
    path = Path(path)
    items, expected = _manifest(path)
    seen = set()
    for name, data in _members(path):
        if name == MANIFEST:
            continue
        want = expected.get(name)
        if want is None:
            raise InputError(f"{path}: {name} is not listed in the manifest")
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise InputError(f"{path}: {name} does not match its size and sha256 in the manifest")
        try:
            decode_image(data, images.max_pixels)
        except InputError as e:
            raise InputError(f"{path}: {name}: {e}") from None
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise InputError(f"{path}: {len(missing)} photos listed in the manifest are missing (first: {missing[0]}); "
                         "the archive is incomplete")
    return items


def _manifest(path: Path) -> tuple[list[ArchivedItem], dict[str, dict]]:
    first = next(_members(path, only_first=True), None)
    if first is None or first[0] != MANIFEST:
        raise InputError(f"{path}: not a catalog archive (no {MANIFEST} first)")
    try:
        doc = json.loads(first[1].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{path}: not a catalog archive (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise InputError(f"{path}: archive version {doc.get('version')!r}; this device reads version {VERSION}")
    items, expected, ids = [], {}, set()
    for raw in doc.get("items") or []:
        try:
            item_id, label = validate_id(raw["id"]), validate_label(raw["label"])
            attributes = validate_attributes(raw.get("attributes", {}))
            photos = tuple({"photo": str(p.get("photo", "" if i == 0 else str(i + 1))), "file": str(p["file"]),
                            "bytes": int(p["bytes"]), "sha256": str(p["sha256"])} for i, p in enumerate(raw["photos"]))
            names = [validate_key(photo_key(item_id, p["photo"])) for p in photos]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: a malformed item in {MANIFEST} ({type(e).__name__}: {e})") from None
        except InputError as e:
            raise InputError(f"{path}: item {raw.get('id')!r}: {e}") from None
        if item_id in ids:
            raise InputError(f"{path}: item {item_id!r} is listed twice")
        if not photos or names[0] != item_id or len(set(names)) != len(names):
            raise InputError(f"{path}: item {item_id!r} needs photos with distinct names, its first one named \"\"")
        ids.add(item_id)
        items.append(ArchivedItem(item_id, label, attributes, photos))
        expected.update({p["file"]: p for p in photos})
    return items, expected


def _members(path: Path, only_first: bool = False) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the archive's regular files in order; a damaged or truncated tar is InputError."""
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise InputError(f"{path}: {info.name} is not a regular file")
                if info.name == MANIFEST and info.size > MAX_MANIFEST_BYTES:
                    raise InputError(f"{path}: {MANIFEST} is over {MAX_MANIFEST_BYTES // 2**20} MB")
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise InputError(f"{path}: {info.name} is cut short: the archive is truncated")
                yield info.name, data
                if only_first:
                    return
    except (tarfile.TarError, EOFError) as e:
        raise InputError(f"{path}: not a readable archive, or truncated ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


def import_catalog(store: CatalogStore, path: str | os.PathLike, photos_of: Callable[[str], list[str]], *,
                   replace: bool = False, images: ImagesConfig = ImagesConfig(),
                   max_photos: int | None = None) -> ArchiveReport:
    """Check the whole archive (``read_archive``), refuse items the catalog already has (``photos_of(id)``: the
    entry keys of its photos) unless ``replace`` (then their photos not in the archive are removed), and items
    of more than ``max_photos``; then commit every photo to the store in one transaction (all or nothing); the
    running catalog indexes them like enrolments. Raises InputError before anything is written."""
    items = read_archive(path, images)
    existing = {it.id: keys for it in items if (keys := photos_of(it.id))}
    clash = sorted(existing)
    if clash and not replace:
        raise InputError(f"{len(clash)} items of the archive are already in the catalog (first: {clash[0]!r}); "
                         "import with --replace to overwrite them; nothing was imported")
    big = [it.id for it in items if max_photos is not None and len(it.photos) > max_photos]
    if big:
        raise InputError(f"{len(big)} items of the archive have more than {max_photos} photos (first: {big[0]!r}; "
                         "catalog.max_photos_per_item); nothing was imported")
    by_file = {p["file"]: (it, photo_key(it.id, p["photo"])) for it in items for p in it.photos}
    rep = ArchiveReport(items=len(items), photos=len(by_file), replaced=clash)

    def rows():  # streamed from the archive into the one transaction (checked a moment ago)
        for it in items:
            kept = {photo_key(it.id, p["photo"]) for p in it.photos}
            yield from ((key, True, None, None) for key in existing.get(it.id, []) if key not in kept)
        for name, data in _members(Path(path)):
            if name in by_file:
                it, key = by_file[name]
                rep.bytes += len(data)
                yield key, False, it.label, data, it.attributes

    store.import_rows(rows(), f"import:{Path(path).name}")
    rep.store_seq = store.seq()
    return rep
