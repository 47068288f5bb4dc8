"""Catalog items from images: one ``ItemMaker`` turns an RGB image into a CatalogItem (with the SAME encoder
and settings the device queries with), used by ``index build``, ``catalog add``, ``POST /api/catalog`` and the
demo; the id and label rules; labels files; ``index build`` of a folder. What was enrolled or removed at run
time lives in the catalog store (device/store.py, device/catalog_service.py)."""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import verify
from .adapt import AdaptationFit
from .config import RecognitionConfig
from .errors import CatalogIndexError, ImageError, InputError
from .images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, check_shape, is_image_file, make_thumbnail, read_image
from .index import CatalogItem
from .index_writer import write_index
from .views import padded_view

log = logging.getLogger(__name__)
MAX_ID_CHARS = 200
MAX_ID_PART_BYTES = 120  # a part becomes a file name under enrolled_dir: ext4 allows 255 bytes
MAX_LABEL_CHARS = 200
_ID_PART_RE = re.compile(r"^\w[\w.\- ]*$")
ID_RULE = (f"an id is up to {MAX_ID_CHARS} characters in parts separated by '/'; each part starts with a letter, "
           f"digit or '_', then letters, digits, '_', '-', '.' or spaces, at most {MAX_ID_PART_BYTES} bytes in UTF-8 "
           "(no empty parts, no leading '.', no '..')")


def validate_id(item_id: str) -> str:
    """Check a catalog id against the one id rule (``ID_RULE``); it is also a relative path under
    ``enrolled_dir``, so it must stay inside it and be a legal, visible file name. Raises InputError (400)."""
    parts = item_id.split("/") if isinstance(item_id, str) else [""]
    if (not isinstance(item_id, str) or len(item_id) > MAX_ID_CHARS or item_id != item_id.strip()
            or any(not _ID_PART_RE.match(p) or len(p.encode("utf-8")) > MAX_ID_PART_BYTES for p in parts)):
        raise InputError(f"invalid catalog id {item_id!r}: {ID_RULE}")
    return item_id


def validate_label(label: str) -> str:
    """Labels are shown on the page and in events: 1–MAX_LABEL_CHARS printable characters. Raises InputError."""
    label = label.strip()
    if not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise InputError(f"invalid label ({len(label)} characters): a label is at most {MAX_LABEL_CHARS} printable "
                         "characters, and not empty")
    return label


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
        check_shape(rgb.shape[1], rgb.shape[0])
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
    adapted: dict | None = None  # the fitted projection (Projection.describe()), None without adaptation


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
    unless ``allow_empty`` (a fresh appliance that will be enrolled over HTTP). With ``recognition.adapt``
    the catalog-adapted projection is fitted on synthetic views of (a sample of) the images and stored."""
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
    enc, rc = maker.encoder, maker.recognition
    fit = AdaptationFit(enc.embed, rc, enc.sha256, enc.dim) if rc.adapt else None
    sample = fit.sample(len(paths)) if fit is not None else set()
    for row, path in enumerate(tqdm(paths, desc="indexing", unit="img", disable=not progress)):
        rel = path.relative_to(folder)
        item_id = rel.with_suffix("").as_posix()
        try:
            if item_id in seen:
                raise ImageError(f"duplicate id {item_id!r} (also {seen[item_id]})")
            rgb = read_image(path, max_pixels)
            items.append(maker.make(rgb, item_id, labels.get(item_id), source=str(path)))
            seen[item_id] = rel.as_posix()
            if row in sample:  # seeded by the row: the same folder gives the same projection
                fit.add(rgb, items[-1].vector[0], seed=row)
        except (InputError, CatalogIndexError) as e:
            rep.skipped.append((rel.as_posix(), str(e)))
            log.warning("skipped %s: %s", rel, e)
    if not items and not allow_empty:
        raise CatalogIndexError(f"{folder}: all {len(rep.skipped)} image files were skipped (first: "
                                f"{rep.skipped[0][0]}: {rep.skipped[0][1]}); the index was not changed")
    projection = fit.fit() if fit is not None else None
    gen = write_index(index_path, items, bundle_sha256=enc.sha256, n_trees=n_trees, dim=enc.dim, projection=projection)
    rep.indexed, rep.generation, rep.seconds = len(items), gen.name, time.perf_counter() - t0
    rep.adapted = projection.describe() if projection is not None else None
    return rep
