"""Catalog items from images: one ``ItemMaker`` turns an RGB image into a CatalogItem (with the SAME encoder
and settings the device queries with), used by ``index build``, ``catalog add``, ``POST /api/catalog`` and the
demo; ``index build`` of a folder (ids, labels and labels files: edge_retrieval/catalog/ids.py). What was enrolled or removed at run
time lives in the catalog store (edge_retrieval/catalog/store.py, edge_retrieval/catalog/service.py)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from edge_retrieval.catalog.ids import MAX_LABEL_CHARS, item_and_photo, path_stem, validate_key
from edge_retrieval.core.config import ImagesConfig, RecognitionConfig
from edge_retrieval.core.errors import CatalogIndexError, InputError
from edge_retrieval.core.photos import item_of, photo_key
from edge_retrieval.imaging.codec import IMAGE_SUFFIXES, check_shape, is_image_file, make_thumbnail, read_image
from edge_retrieval.imaging.synthetic_views import padded_view
from edge_retrieval.index.reader import CatalogItem
from edge_retrieval.index.writer import NewGeneration
from edge_retrieval.model import local_features as verify
from edge_retrieval.model.adaptation import AdaptationFit, view_descriptors

log = logging.getLogger(__name__)
class ItemMaker:
    """Encodes catalog images into index items: descriptors of the image and of its padded views
    (``recognition.enrol_views``: a print seen from further away), ORB features when ``recognition.features``,
    and a JPEG thumbnail of at most ``thumbnail_px``. Holds the SAME encoder the device queries with."""

    def __init__(self, encoder, recognition: RecognitionConfig, thumbnail_px: int):
        self.encoder = encoder
        self.recognition = recognition
        self.thumbnail_px = thumbnail_px

    def make(self, rgb: np.ndarray, item_id: str, label: str | None = None, *,
             source: str | None = None, attributes: dict[str, str] | None = None) -> CatalogItem:
        """One catalog photo (RGB uint8 HxWx3) → a CatalogItem; ``item_id`` is its entry key (an item id, or
        ``<id>#<photo>``), ``label`` defaults to the item id's last part."""
        rc = self.recognition
        check_shape(rgb.shape[1], rgb.shape[0])
        vectors = [self.encoder.embed(rgb)] + [self.encoder.embed(padded_view(rgb, f)) for f in rc.enrol_views]
        features = verify.extract(rgb, rc) if rc.features else None
        return CatalogItem(id=validate_key(item_id), label=label or Path(item_of(item_id)).name,
                           vector=np.stack(vectors), thumbnail_jpeg=make_thumbnail(rgb, self.thumbnail_px),
                           source=source, features=features, attributes=dict(attributes or {}))

    def spec(self, num_threads: int) -> MakerSpec:
        """What a build worker needs to make the same items with its own encoder of ``num_threads`` threads."""
        return MakerSpec(Path(self.encoder.bundle_dir), num_threads, self.recognition, self.thumbnail_px)


@dataclass(frozen=True)
class MakerSpec:
    """How a build worker (a process, a Ray actor) makes its own ItemMaker: the same bundle and settings as the
    driver's, its own encoder loaded once. Picklable."""

    bundle_dir: Path
    num_threads: int
    recognition: RecognitionConfig
    thumbnail_px: int

    def maker(self) -> ItemMaker:
        """Load the encoder (``num_threads`` interpreter threads, and as many OpenCV threads: the worker's
        share of the cores) and wrap it in an ItemMaker."""
        import cv2

        from edge_retrieval.model.encoder import Encoder
        cv2.setNumThreads(self.num_threads)
        enc = Encoder.from_bundle(self.bundle_dir, num_threads=self.num_threads)
        return ItemMaker(enc, self.recognition, self.thumbnail_px)


class Runner(Protocol):
    """Runs the per-item work of a build elsewhere (worker processes, a Ray cluster)."""

    def map(self, tasks: list[BuildTask]) -> Iterable[ItemResult]:
        """:func:`make_entry` of every task, results in any order."""

    def describe(self) -> str:
        """What runs the work, for the build report (e.g. '2 worker processes × 1 thread')."""

    def close(self) -> None:
        """Release the workers (build_index calls it when the build ends, written or failed)."""


@dataclass
class BuildReport:
    """What an index build did: items and their wall time, the adaptation views (a fixed cost of at most
    ``adapt_max_items`` items) and theirs, what was skipped and why."""

    indexed: int = 0  # photos indexed
    items: int = 0  # the items they are photos of
    skipped: list[tuple[str, str]] = field(default_factory=list)  # image files that gave no item, and why
    ignored: list[tuple[str, str]] = field(default_factory=list)  # other files in the folder, and why
    hidden: int = 0  # files under a name starting with '.', passed over
    generation: str = ""
    seconds: float = 0.0
    adapted: dict | None = None  # the fitted projection (Projection.describe()), None without adaptation
    items_seconds: float = 0.0  # wall time of the items (decode, descriptors, features, thumbnail)
    adapt_items: int = 0  # items whose adaptation views were made
    adapt_seconds: float = 0.0  # wall time of those views
    workers: str = "in process"  # what ran the per-item work

    @property
    def items_per_s(self) -> float:
        """Catalog images (indexed or skipped) per second of the item pass."""
        return (self.indexed + len(self.skipped)) / self.items_seconds if self.items_seconds > 0 else 0.0


@dataclass(frozen=True)
class BuildTask:
    """One image of a build: make its item (``enrol``) and/or the descriptors of its adaptation views
    (``views_seed`` not None). Picklable: a worker process or a Ray actor runs it with :func:`make_entry`."""

    row: int
    path: str
    rel: str
    item_id: str
    label: str | None
    max_pixels: int
    enrol: bool = True
    views_seed: int | None = None
    photo: str = ""  # the photo's name in its item folder ("" for a file directly in the catalog folder)
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemResult:
    """What :func:`make_entry` made of a BuildTask: the item, the view descriptors, or why it was skipped."""

    row: int
    rel: str
    item: CatalogItem | None = None
    views: np.ndarray | None = None
    error: str | None = None


def make_entry(maker: ItemMaker, task: BuildTask) -> ItemResult:
    """The per-item work of every build, in process, in a worker process or in a Ray actor: decode, the
    item (descriptors incl. enrolment views, local features, thumbnail) and the adaptation views' descriptors.
    An unreadable or invalid image gives an ItemResult with ``error`` (skipped and listed, never fatal)."""
    try:
        rgb = read_image(task.path, task.max_pixels)
        item = maker.make(rgb, task.item_id, task.label, source=task.path,
                          attributes=task.attributes) if task.enrol else None
        views = None
        if task.views_seed is not None:
            views = view_descriptors(maker.encoder.embed, rgb, maker.recognition.adapt_views, task.views_seed)
        return ItemResult(task.row, task.rel, item, views)
    except (InputError, CatalogIndexError) as e:
        return ItemResult(task.row, task.rel, error=str(e))


def make_entries(maker: ItemMaker, tasks: Iterable[BuildTask]) -> Iterator[ItemResult]:
    """The in-process runner: :func:`make_entry` of each task, in order."""
    return (make_entry(maker, t) for t in tasks)


def scan_folder(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted (recursively)."""
    return scan_catalog_folder(folder)[0]


def scan_catalog_folder(folder: Path) -> tuple[list[Path], list[tuple[str, str]], int]:
    """What a catalog folder holds: its image files (sorted, recursively), the other files with why they are not
    items (relative path, reason), and how many hidden files (a part starting with '.') were passed over."""
    if not folder.is_dir():
        raise CatalogIndexError(f"{folder}: catalog folder does not exist")
    images, others, hidden = [], [], 0
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            hidden += 1
        elif is_image_file(p.name):
            images.append(p)
        else:
            others.append((rel.as_posix(), f"not an image file (looked for {' '.join(sorted(IMAGE_SUFFIXES))})"))
    return sorted(images), sorted(others), hidden


def build_index(folder: str | Path, maker: ItemMaker, index_path: str | Path, *, n_trees: int,
                labels: dict[str, str] | None = None, images: ImagesConfig = ImagesConfig(),
                progress: bool = True, allow_empty: bool = False, runner: Runner | None = None,
                attributes: dict[str, dict[str, str]] | None = None, max_photos: int = 50) -> BuildReport:
    """Index every image of ``folder``: a file directly in it is an item of one photo (id = its name without
    extension), the files of a sub-folder are the photos of one item (id = the folder's path; at most
    ``max_photos``, the rest skipped and listed); labels and ``attributes`` by id (edge_retrieval/catalog/ids.py).
    Unreadable files are skipped and reported; the new index replaces the old one atomically. A folder that gives no
    item (no images, or every one unreadable) raises CatalogIndexError and leaves the old index alone,
    unless ``allow_empty`` (a fresh appliance that will be enrolled over HTTP). With ``recognition.adapt``
    the catalog-adapted projection is fitted on synthetic views of (a sample of) the images and stored. Each
    file decodes within ``images.max_pixels``.

    ``runner`` maps BuildTasks to ItemResults (any order) with :func:`make_entry`: None runs them here with
    ``maker``; edge_retrieval/catalog/build_workers.py runs them in worker processes, edge_retrieval/catalog/ray_build.py on Ray. Only this driver writes."""
    t0 = time.perf_counter()
    folder = Path(folder)
    labels = labels or {}
    rep = BuildReport()
    run = runner.map if runner is not None else (lambda tasks: make_entries(maker, tasks))
    paths, rep.ignored, rep.hidden = scan_catalog_folder(folder)
    if not paths and not allow_empty:
        # a wrong --catalog path or a folder of HEIC/RAW files: say what was looked for
        raise CatalogIndexError(f"{folder}: no images found (looked for {' '.join(sorted(IMAGE_SUFFIXES))}; "
                                f"{len(rep.ignored) + rep.hidden} other files ignored); the index was not changed")
    tasks = [_task(row, p.relative_to(folder).as_posix(), str(p), labels, attributes or {}, images.max_pixels)
             for row, p in enumerate(paths)]
    del paths  # ≈ 300 bytes an image as Path objects (0.3 GB at 1M); the tasks (≈ 430 bytes each) are the list
    tasks = _within_photo_limit(tasks, max_photos, rep)
    try:
        return _build(folder, maker, index_path, tasks, run, rep, n_trees, allow_empty, progress, t0, max_photos)
    finally:
        if runner is not None:
            rep.workers = runner.describe()  # after the work: a Ray runner knows its actors only then
            runner.close()


def _task(row: int, rel: str, path: str, labels: dict[str, str], attributes: dict[str, dict[str, str]],
          max_pixels: int) -> BuildTask:
    """The BuildTask of one image: its item and photo from the file's name and folder (``item_and_photo``), its
    label and attributes from the labels file (by id or by the name as the user wrote it), the label else the
    item's own name (the file's, or the item folder's)."""
    stem = path_stem(rel) if "/" not in rel else rel.rsplit("/", 1)[0]
    try:
        item_id, photo = item_and_photo(rel)
    except InputError:  # no name maps to nothing the rule takes, but the task must still be listed as skipped
        item_id, photo = stem, ""
    label = labels.get(item_id) or labels.get(stem) or stem.rsplit("/", 1)[-1]
    return BuildTask(row, path, rel, item_id, label[:MAX_LABEL_CHARS].strip() or None, max_pixels, photo=photo,
                     attributes=attributes.get(item_id) or attributes.get(stem) or {})


def _within_photo_limit(tasks: list[BuildTask], max_photos: int, rep: BuildReport) -> list[BuildTask]:
    """The tasks of each item's first ``max_photos`` files; the others are listed as skipped before any is decoded
    (an item folder of 10,000 photos costs a directory listing, not 10,000 encodes)."""
    counts: dict[str, int] = {}
    kept = []
    for t in tasks:
        counts[t.item_id] = counts.get(t.item_id, 0) + 1
        if counts[t.item_id] <= max_photos:
            kept.append(t)
        else:
            rep.skipped.append((t.rel, f"item {t.item_id!r} has {max_photos} photos already "
                                       "(catalog.max_photos_per_item)"))
    return kept


def _build(folder: Path, maker: ItemMaker, index_path: str | Path, tasks: list[BuildTask],
           run: Callable[[list[BuildTask]], Iterable[ItemResult]], rep: BuildReport, n_trees: int,
           allow_empty: bool, progress: bool, t0: float, max_photos: int) -> BuildReport:
    # Each item goes to the new generation's files as it arrives (NewGeneration): the driver holds no item but
    # the sampled rows' descriptors that the adaptation fit needs (≤ adapt_max_items).
    enc, rc = maker.encoder, maker.recognition
    fit = AdaptationFit(enc.embed, rc, enc.sha256, enc.dim) if rc.adapt else None
    sample = {tasks[i].row for i in fit.sample(len(tasks))} if fit is not None else set()
    originals: dict[int, np.ndarray] = {}
    seen: dict[str, str] = {}  # entry key → the file that made it
    photos: dict[str, int] = {}  # item id → photos indexed
    by_row = {t.row: t for t in tasks}
    with NewGeneration(index_path, dim=enc.dim) as new:
        results = tqdm(run(tasks), total=len(tasks), desc="indexing", unit="img", disable=not progress)
        for r in _in_task_order(results, tasks):  # as a one-process build meets them: the first file of an id wins
            if r.item is not None:  # an item's first photo indexed is keyed by its id, the others by their names
                photo = by_row[r.row].photo
                key = photo_key(r.item.id, photo) if r.item.id in photos else r.item.id
                if key in seen or (r.item.id in photos and not photo):
                    r = ItemResult(r.row, r.rel, error=f"duplicate id {key!r} (also {seen.get(key, seen[r.item.id])})")
                elif photos.get(r.item.id, 0) >= max_photos:
                    r = ItemResult(r.row, r.rel, error=f"item {r.item.id!r} has {max_photos} photos already "
                                                       "(catalog.max_photos_per_item)")
                else:
                    r = replace(r, item=replace(r.item, id=key))
            if r.error is not None:
                rep.skipped.append((r.rel, r.error))
                log.warning("skipped %s: %s", r.rel, r.error)
                continue
            seen[r.item.id] = r.rel
            photos[item_of(r.item.id)] = photos.get(item_of(r.item.id), 0) + 1
            new.add(r.item)
            if r.row in sample:
                originals[r.row] = np.asarray(r.item.vector, np.float32).reshape(-1, enc.dim)[0]
        rep.items_seconds = time.perf_counter() - t0
        if not new.count and not allow_empty:
            raise CatalogIndexError(f"{folder}: all {len(rep.skipped)} image files were skipped (first: "
                                    f"{rep.skipped[0][0]}: {rep.skipped[0][1]}); the index was not changed")
        projection = _fit_projection(run, fit, tasks, originals, rep, progress) if fit is not None else None
        gen = new.commit(bundle_sha256=enc.sha256, n_trees=n_trees, projection=projection)
        rep.indexed, rep.items = new.count, len(photos)
    rep.generation, rep.seconds = gen.name, time.perf_counter() - t0
    rep.adapted = projection.describe() if projection is not None else None
    return rep


def _in_task_order(results: Iterable[ItemResult], tasks: list[BuildTask]) -> Iterator[ItemResult]:
    """``results`` in the order of ``tasks``, from a runner that may return them in any order: the ones that come
    early wait here (worker processes and Ray keep the order, so none wait for long)."""
    waiting: dict[int, ItemResult] = {}
    rows = iter([t.row for t in tasks])
    nxt = next(rows, None)
    for r in results:
        waiting[r.row] = r
        while nxt in waiting:
            yield waiting.pop(nxt)
            nxt = next(rows, None)
    yield from (waiting[row] for row in sorted(waiting))


def _fit_projection(run: Callable[[list[BuildTask]], Iterable[ItemResult]], fit: AdaptationFit,
                    tasks: list[BuildTask], originals: dict[int, np.ndarray], rep: BuildReport, progress: bool):
    """The adaptation pass: views of a seeded sample of the indexed rows (seeded by the row: the same folder
    gives the same projection, however the rows were spread over workers); ``originals``: their descriptors."""
    t0 = time.perf_counter()
    by_row = {t.row: t for t in tasks}
    view_tasks = [replace(by_row[row], enrol=False, views_seed=row) for row in sorted(originals)]
    for r in _in_task_order(tqdm(run(view_tasks), total=len(view_tasks), desc="adaptation views", unit="img",
                                 disable=not progress), view_tasks):
        if r.error is None:  # it decoded a moment ago; a file changed meanwhile only thins the sample
            fit.add_views(originals[r.row], r.views)
    rep.adapt_items, rep.adapt_seconds = len(view_tasks), time.perf_counter() - t0
    return fit.fit()
