"""Catalog items from images: one ``ItemMaker`` turns an RGB image into a CatalogItem (with the SAME encoder
and settings the device queries with), used by ``index build``, ``catalog add``, ``POST /api/catalog`` and the
demo; labels files; the store of originals enrolled at run time."""
from __future__ import annotations

import csv
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import verify
from .config import RecognitionConfig
from .errors import CatalogIndexError, ImageError
from .images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, is_image_file, make_thumbnail, read_image
from .index import CatalogItem
from .index_writer import write_index
from .views import padded_view

log = logging.getLogger(__name__)
_ID_RE = re.compile(r"^[\w][\w.\-/ ]{0,199}$")


def validate_id(item_id: str) -> str:
    """Catalog ids are relative-path-like: letters, digits, _ - . / and spaces, no '..', ≤ 200 chars."""
    if not _ID_RE.match(item_id) or ".." in item_id.split("/") or item_id.endswith("/"):
        raise CatalogIndexError(f"invalid catalog id {item_id!r}: use letters, digits, '_', '-', '.', '/', "
                                "spaces (no leading '/', no '..', at most 200 characters)")
    return item_id


class ItemMaker:
    """Encodes catalog images into index items: descriptors of the image and of its padded views
    (``recognition.enrol_views``: a print seen from further away), ORB features when ``recognition.features``,
    and a JPEG thumbnail of at most ``thumbnail_px``. Holds the SAME encoder the device queries with."""

    def __init__(self, encoder, recognition: RecognitionConfig, thumbnail_px: int):
        self.encoder = encoder
        self.recognition = recognition
        self.thumbnail_px = thumbnail_px

    def make(self, rgb: np.ndarray, item_id: str, label: str | None = None, *,
             source: str | None = None) -> CatalogItem:
        """One catalog image (RGB uint8 HxWx3) → a CatalogItem; ``label`` defaults to the id's file name."""
        rc = self.recognition
        vectors = [self.encoder.embed(rgb)] + [self.encoder.embed(padded_view(rgb, f)) for f in rc.enrol_views]
        features = verify.extract(rgb, rc) if rc.features else None
        return CatalogItem(id=validate_id(item_id), label=label or Path(item_id).name, vector=np.stack(vectors),
                           thumbnail_jpeg=make_thumbnail(rgb, self.thumbnail_px), source=source,
                           features=features)


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


@dataclass
class BuildReport:
    """What an index build did."""

    indexed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    generation: str = ""
    seconds: float = 0.0


def scan_folder(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted (recursively)."""
    if not folder.is_dir():
        raise CatalogIndexError(f"{folder}: catalog folder does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p.name)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def build_index(folder: str | Path, maker: ItemMaker, index_path: str | Path, *, n_trees: int,
                labels: dict[str, str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                progress: bool = True, allow_empty: bool = False) -> BuildReport:
    """Index every image of ``folder`` (id = path relative to the folder without extension). Unreadable
    files are skipped and reported; the new index replaces the old one atomically. A folder that gives no
    item (no images, or every one unreadable) raises CatalogIndexError and leaves the old index alone,
    unless ``allow_empty`` (a fresh appliance that will be enrolled over HTTP)."""
    import time
    t0 = time.perf_counter()
    folder = Path(folder)
    labels = labels or {}
    rep = BuildReport()
    items: list[CatalogItem] = []
    seen: dict[str, str] = {}
    paths = scan_folder(folder)
    if not paths and not allow_empty:
        # a wrong --catalog path or a folder of HEIC/RAW files: say what was looked for
        others = sum(1 for p in folder.rglob("*") if p.is_file())
        raise CatalogIndexError(f"{folder}: no images found (looked for {' '.join(sorted(IMAGE_SUFFIXES))}; "
                                f"{others} other files ignored); the index was not changed")
    for path in tqdm(paths, desc="indexing", unit="img", disable=not progress):
        rel = path.relative_to(folder)
        item_id = rel.with_suffix("").as_posix()
        try:
            if item_id in seen:
                raise ImageError(f"duplicate id {item_id!r} (also {seen[item_id]})")
            rgb = read_image(path, max_pixels)
            items.append(maker.make(rgb, item_id, labels.get(item_id), source=str(path)))
            seen[item_id] = rel.as_posix()
        except (ImageError, CatalogIndexError) as e:
            rep.skipped.append((rel.as_posix(), str(e)))
            log.warning("skipped %s: %s", rel, e)
    if not items and not allow_empty:
        raise CatalogIndexError(f"{folder}: all {len(rep.skipped)} image files were skipped (first: "
                                f"{rep.skipped[0][0]}: {rep.skipped[0][1]}); the index was not changed")
    gen = write_index(index_path, items, bundle_sha256=maker.encoder.sha256, n_trees=n_trees, dim=maker.encoder.dim)
    rep.indexed, rep.generation, rep.seconds = len(items), gen.name, time.perf_counter() - t0
    return rep


class EnrolledStore:
    """Originals of items enrolled at run time (``catalog.enrolled_dir``): ``<id>.jpg`` + ``labels.json``.
    Kept so that a rebuild (new bundle, lost index) re-creates them: enrolment loses nothing."""

    LABELS = "labels.json"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def _labels(self) -> dict[str, str]:
        path = self.folder / self.LABELS
        return load_labels(path) if path.is_file() else {}

    def _write_labels(self, labels: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.LABELS}.tmp"
        tmp.write_text(json.dumps(labels, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.folder / self.LABELS)

    def save(self, item_id: str, jpeg: bytes, label: str) -> Path:
        """Keep the original (atomically) and its label; returns the file path."""
        dest = self.folder / f"{validate_id(item_id)}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(jpeg)
        tmp.replace(dest)
        with self._lock:
            labels = self._labels()
            labels[item_id] = label
            self._write_labels(labels)
        return dest

    def delete(self, item_id: str) -> None:
        """Forget an enrolled item (no error when it was not enrolled at run time)."""
        (self.folder / f"{item_id}.jpg").unlink(missing_ok=True)
        with self._lock:
            labels = self._labels()
            if labels.pop(item_id, None) is not None:
                self._write_labels(labels)

    def items(self, maker: ItemMaker, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[CatalogItem]:
        """Re-encode every kept original (unreadable ones are skipped and logged)."""
        if not self.folder.is_dir():
            return []
        labels = self._labels()
        out = []
        for path in scan_folder(self.folder):
            item_id = path.relative_to(self.folder).with_suffix("").as_posix()
            try:
                out.append(maker.make(read_image(path, max_pixels), item_id, labels.get(item_id), source=str(path)))
            except (ImageError, CatalogIndexError) as e:
                log.warning("enrolled item %s skipped: %s", item_id, e)
        return out
