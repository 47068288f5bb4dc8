"""Reading the user's image folders: unreadable or non-image files are skipped and counted, never a crash."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.images import IMAGE_SUFFIXES, read_image
from device.errors import ImageError

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Decoded RGB images of a folder, their relative names, what was skipped, and a content hash."""

    images: list[np.ndarray]
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sha256: str = ""
    folder: str = ""

    def manifest_entry(self) -> dict:
        return {"folder": self.folder, "count": len(self.images), "skipped": len(self.skipped),
                "sha256": self.sha256}


def load_folder(folder: str | Path, *, limit: int | None = None) -> ImageSet:
    """Decode every file under ``folder`` (recursively, sorted) as RGB; skip what isn't an image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    h = hashlib.sha256()
    out = ImageSet([], [], folder=str(folder))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            out.skipped.append((rel, "not an image file type"))
            continue
        try:
            img = read_image(path)
        except ImageError as e:
            out.skipped.append((rel, str(e)))
            continue
        out.images.append(img)
        out.names.append(rel)
        h.update(rel.encode() + b"\0" + path.read_bytes())
        if limit and len(out.images) >= limit:
            break
    out.sha256 = h.hexdigest()
    if out.skipped:
        log.warning("%s: skipped %d unreadable or non-image files (e.g. %s: %s)", folder, len(out.skipped),
                    *out.skipped[0])
    return out
