"""How an item's photos are named in the store and the index: one entry per photo, keyed ``<item id>`` (an item's
first photo, as every item had one before several photos were possible) or ``<item id>#<photo>`` for a further
photo. ``#`` is outside the id rule (edge_retrieval/catalog/ids.py), so a key always splits back into its item and
photo. The index and the store hold entries; what a user sees (a match, the catalog's size, the page) is items."""
from __future__ import annotations

PHOTO_SEP = "#"


def photo_key(item_id: str, photo: str = "") -> str:
    """The entry key of photo ``photo`` of ``item_id`` (``""``: the item's first photo, keyed by the id alone)."""
    return f"{item_id}{PHOTO_SEP}{photo}" if photo else item_id


def split_key(key: str) -> tuple[str, str]:
    """(item id, photo name) of an entry key; the photo name is ``""`` for an item's first photo."""
    item_id, _, photo = key.partition(PHOTO_SEP)
    return item_id, photo


def item_of(key: str) -> str:
    """The item id of an entry key."""
    return key.partition(PHOTO_SEP)[0]
