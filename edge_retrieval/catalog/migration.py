"""Migration of what older versions kept in ``catalog.enrolled_dir`` (originals, labels.json, removed.json) into the
catalog store (edge_retrieval/catalog/store.py), once, at the store's first start."""
from __future__ import annotations

import logging
from pathlib import Path

from edge_retrieval.catalog.build import scan_folder
from edge_retrieval.catalog.ids import load_labels, validate_id
from edge_retrieval.catalog.store import CatalogStore
from edge_retrieval.core.errors import InputError

log = logging.getLogger(__name__)
MIGRATED = "migrated_enrolled_dir"


def migrate_enrolled_dir(store: CatalogStore, folder: Path) -> dict | None:
    """At a store's first start, import what older versions kept in ``folder`` (originals ``<id>.jpg``,
    ``labels.json``, ``removed.json``) in one transaction. A damaged labels/removal file is skipped and logged
    (labels fall back to the file name), never fatal. Returns what was imported (None: done before)."""
    if store.meta(MIGRATED) is not None:
        return None
    folder = Path(folder)
    labels, removed = _legacy_json(folder / "labels.json"), _legacy_json(folder / "removed.json")
    removed_at = (folder / "removed.json").stat().st_mtime if (folder / "removed.json").is_file() else 0.0
    rows: list[tuple[str, bool, str | None, bytes | None]] = []
    skipped: list[str] = []
    live: set[str] = set()
    for path in scan_folder(folder) if folder.is_dir() else []:
        item_id = path.relative_to(folder).with_suffix("").as_posix()
        try:
            validate_id(item_id)
            # saved after its removal was journalled (a re-enrolment), or never removed
            if item_id in removed and path.stat().st_mtime < removed_at:
                continue
            rows.append((item_id, False, labels.get(item_id) or Path(item_id).name, path.read_bytes()))
            live.add(item_id)
        except (OSError, InputError) as e:
            log.warning("migration: %s skipped: %s", path, e)
            skipped.append(item_id)
    rows += [(i, True, None, None) for i in sorted(removed) if i not in live]
    store.import_rows(rows, MIGRATED)
    report = {"from": folder.name, "enrolled": len(live), "removed": len(rows) - len(live), "skipped": skipped}
    if rows or skipped:
        log.info("catalog store %s: migrated %d enrolled items and %d removals from %s (no longer read)",
                 store.path, report["enrolled"], report["removed"], folder)
    return report


def _legacy_json(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        return load_labels(path)
    except Exception as e:  # noqa: BLE001 - truncated, empty, [], invalid UTF-8: derived state, never fatal
        log.error("migration: %s is damaged (%s: %s); ignored", path, type(e).__name__, e)
        return {}
