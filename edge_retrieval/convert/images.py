"""Reading the user's image folders: unreadable or non-image files are skipped and counted, never a crash."""
from __future__ import annotations

import hashlib
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_retrieval.core.errors import ImageError
from edge_retrieval.imaging.codec import is_image_file, read_image

log = logging.getLogger(__name__)
# The workstation reads its own folders: the device's upload limit (images.max_pixels, 16 MP) would drop 4K
# wallpapers; this is the limit the converter always had.
MAX_PIXELS = 40_000_000

# The Debian image packages that may train, fit PCA/whitening or calibrate models (with the photos that ship in pip
# packages). Every other image package (mate-backgrounds, …) is held back for evaluation only.
TRAINING_PACKAGES = ("gnome-backgrounds", "ukui-wallpapers")


def training_pool_files(packages: tuple[str, ...] = TRAINING_PACKAGES) -> list[Path]:
    """The image files that ``packages`` installed (from ``dpkg -L``), sorted; [] when none is installed.
    Read from the package lists, not from /usr/share/backgrounds, where held-back packages install too."""
    try:
        listed = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True, check=False).stdout
    except OSError:  # no dpkg: not a Debian system
        return []
    return sorted({Path(line) for line in listed.splitlines()
                   if is_image_file(Path(line).name) and Path(line).is_file()})


def link_training_pool(dest: Path) -> int:
    """Fill ``dest`` with symbolic links to the training pool's images (a folder for ``--train-images``);
    returns how many. Names keep the package folder so two files of one name don't collide."""
    files = training_pool_files()
    if not files:
        raise FileNotFoundError(f"none of {', '.join(TRAINING_PACKAGES)} is installed "
                                f"(apt-get install {' '.join(TRAINING_PACKAGES)})")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():
        if old.is_symlink():
            old.unlink()
    for path in files:
        (dest / "_".join(path.parts[-2:])).symlink_to(path)
    return len(files)


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
        if not is_image_file(path.name):
            out.skipped.append((rel, "not an image file type (or hidden)"))
            continue
        try:
            img = read_image(path, MAX_PIXELS)
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
