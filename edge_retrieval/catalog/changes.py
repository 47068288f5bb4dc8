"""The changes a user makes to the catalog, as the catalog service takes them (``CatalogService`` is a
``CatalogChanges``): enrol an item (409 for an id in use unless replace), add a photo to it, list and remove its
photos, remove it. Each is validated and encoded before anything is written, then committed to the store in one
transaction, then the service's worker is woken to put it into the index's delta. HTTP and the CLI both call these.
"""
from __future__ import annotations

import itertools
import threading
import uuid

import numpy as np

from edge_retrieval.catalog.build import ItemMaker
from edge_retrieval.catalog.ids import validate_attributes, validate_id, validate_key, validate_label
from edge_retrieval.catalog.store import CatalogStore
from edge_retrieval.core.config import CatalogConfig
from edge_retrieval.core.errors import BusyError, InputError
from edge_retrieval.core.photos import photo_key, split_key
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.index.encoded_item import encode_item
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.reader import CatalogItem

ORIGINAL_JPEG_QUALITY = 95  # the enrolled original kept in the store (the item is re-encoded from it)


class CatalogChanges:
    """The change half of the catalog service: what it needs of the service is its config, store, live index,
    item maker, the cache of enrolments not indexed yet (under ``_cond``), the worker's wake event and the
    space check."""

    config: CatalogConfig
    store: CatalogStore
    holder: IndexHolder
    maker: ItemMaker
    _cond: threading.Condition
    _claim: threading.Lock  # an id's checks and its write, one change at a time (two enrolments of one new id)
    _cache: dict[str, tuple[int, CatalogItem]]
    _wake: threading.Event
    _rebuild_s: float

    def _sha(self) -> str:
        raise NotImplementedError

    def _ensure_space(self, change_bytes: int) -> None:
        raise NotImplementedError

    @staticmethod
    def validate(item_id: str | None, label: str) -> tuple[str, str]:
        """(id, label) checked against the rules (a new id when none is given); InputError (400)."""
        return validate_id(item_id or f"enrolled/{uuid.uuid4().hex[:12]}"), validate_label(label)

    def photo_keys(self, item_id: str) -> list[str]:
        """The entry keys of every photo of item ``item_id`` in the catalog — the live index's and those enrolled in
        the store but not indexed yet, less those whose removal is waiting — its first photo first."""
        keys = dict.fromkeys(self.holder.current().photos(item_id) + self.store.photo_keys(item_id))
        waiting = [k for k in keys if (row := self.store.get(k)) is not None and row.removed]
        return sorted((k for k in keys if k not in waiting), key=lambda k: k != item_id)

    def _admit(self) -> None:
        with self._cond:
            waiting = len(self._cache)
        if waiting >= self.config.max_pending_enrolments:
            raise BusyError(f"{waiting} enrolments are waiting to be indexed (catalog.max_pending_enrolments); "
                            "try again shortly", retry_after_s=max(1, round(self._rebuild_s)))

    def _put(self, rgb: np.ndarray, key: str, label: str, attributes: dict[str, str],
             replacing: list[str] = ()) -> tuple[int, CatalogItem]:
        """Encode ``rgb`` as the entry ``key``, commit its original and encoding (and the removal of ``replacing``)
        in one transaction, and wake the worker."""
        item = self.maker.make(rgb, key, label, attributes=attributes)
        jpeg = encode_jpeg(rgb, ORIGINAL_JPEG_QUALITY)
        encoded = encode_item(item, self._sha())
        self._ensure_space(2 * (len(jpeg) + len(encoded)))  # the WAL, then the database
        seq = self.store.put(key, label, jpeg, encoded, attributes=attributes, replacing=replacing)
        with self._cond:
            for k in replacing:
                self._cache.pop(k, None)
            self._cache[key] = (seq, item)
        self._wake.set()
        return seq, item

    def enrol(self, rgb: np.ndarray, item_id: str | None, label: str, *,
              attributes: dict[str, str] | None = None, replace: bool = False) -> dict:
        """Encode ``rgb`` as the photo of catalog item ``item_id`` with its ``label`` and ``attributes``, commit its
        original and its encoding to the store, and wake the worker (searchable within milliseconds). An id the
        catalog has already is InputError (409) unless ``replace``: then the item's other photos go in the same
        transaction. When this returns the enrolment is durable. InputError (400) before anything is written,
        BusyError (503) with too many waiting, DiskFullError (507) without the space."""
        item_id, label = self.validate(item_id, label)
        attributes = validate_attributes(attributes or {})
        self._admit()
        with self._claim:  # the check and the write at once: of two enrolments of one new id, the second is a 409
            existing = self.photo_keys(item_id)
            if existing and not replace:
                raise InputError(f"item {item_id!r} is in the catalog already ({len(existing)} photos): add a photo "
                                 "to it, or enrol with replace to start it anew", http_status=409)
            seq, item = self._put(rgb, item_id, label, attributes, [k for k in existing if k != item_id])
        return {"id": item_id, "label": item.label, "attributes": attributes, "status": "queued", "seq": seq,
                "replaced": bool(existing)}

    def add_photo(self, rgb: np.ndarray, item_id: str, photo: str | None = None) -> dict:
        """Add ``rgb`` as one more photo of item ``item_id`` (named ``photo``, or the next free number), with the
        item's label and attributes. InputError: 404 for an item not in the catalog, 409 for a photo name in use or
        an item at ``catalog.max_photos_per_item``, 400 for a bad name."""
        with self._claim:  # two photos added at once get two names (the next free number is taken in here)
            return self._add_photo(rgb, validate_id(item_id), photo)

    def _add_photo(self, rgb: np.ndarray, item_id: str, photo: str | None) -> dict:
        keys = self.photo_keys(item_id)
        if not keys:
            raise InputError(f"item {item_id!r} is not in the catalog", http_status=404)
        if len(keys) >= self.config.max_photos_per_item:
            raise InputError(f"item {item_id!r} has {len(keys)} photos (catalog.max_photos_per_item); remove one "
                             "first", http_status=409)
        names = {split_key(k)[1] for k in keys}
        photo = photo or next(str(n) for n in itertools.count(2) if str(n) not in names)
        key = validate_key(photo_key(item_id, photo))
        if photo in names:
            raise InputError(f"item {item_id!r} has a photo {photo!r} already; remove it first", http_status=409)
        label, attributes = self._described(keys[0])
        self._admit()
        seq, _ = self._put(rgb, key, label, attributes)
        return {"id": item_id, "photo": photo, "status": "queued", "seq": seq}

    def describe(self, item_id: str) -> tuple[str, dict[str, str], list[str]]:
        """(label, attributes, the names of its photos — ``""`` its first) of item ``item_id``; InputError 404 when
        it is not in the catalog."""
        keys = self.photo_keys(item_id)
        if not keys:
            raise InputError(f"item {item_id!r} is not in the catalog", http_status=404)
        return (*self._described(keys[0]), [split_key(k)[1] for k in keys])

    def _described(self, key: str) -> tuple[str, dict[str, str]]:
        """(label, attributes) of the item of entry ``key``: the store's latest change, else the index's."""
        row = self.store.get(key)
        if row is not None and not row.removed:
            return row.label or split_key(key)[0], row.attributes
        it = self.holder.current().item(key)
        return it.label, it.attributes

    def photos(self, item_id: str) -> list[str]:
        """The names of the photos of item ``item_id`` (``""``: its first); InputError 404 when the item is not in
        the catalog."""
        return self.describe(item_id)[2]

    def remove_photo(self, item_id: str, photo: str) -> int:
        """Commit the removal of one photo of an item; returns its store seq. InputError 404 for a photo the item
        does not have, 409 for its first photo while it has others (the item is known by it: remove the item, or
        enrol it anew with replace)."""
        with self._claim:
            return self._remove_photo(item_id, photo)

    def _remove_photo(self, item_id: str, photo: str) -> int:
        keys = self.photo_keys(item_id)
        key = photo_key(item_id, photo)
        if key not in keys:
            raise InputError(f"item {item_id!r} has no photo {photo!r}", http_status=404)
        if key == item_id and len(keys) > 1:
            raise InputError(f"the first photo of {item_id!r} stays while the item has others: remove those first, "
                             "remove the item, or enrol it anew with replace", http_status=409)
        return self._remove_keys([key])

    def remove(self, item_id: str) -> int | None:
        """Commit the removal of item ``item_id`` — every photo of it — (tombstones) and wake the worker; returns
        the store seq, or None when the item is neither in the index nor waiting in the store (nothing is written
        then)."""
        with self._claim:
            keys = self.photo_keys(item_id)
            return self._remove_keys(keys) if keys else None

    def _remove_keys(self, keys: list[str]) -> int:
        self._ensure_space(0)
        seq = self.store.remove_all(keys)
        with self._cond:
            for k in keys:
                self._cache.pop(k, None)
        self._wake.set()
        return seq
