"""What the web layer needs of the appliance, written once: ``edge_retrieval.app.appliance.Appliance`` satisfies it, and so
does the fake that tests/test_web.py drives the routes with (tests/test_layout.py checks both against it,
signature by signature)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the web layer never imports model code at run time
    from edge_retrieval.core.results import LookupResult
    from edge_retrieval.core.status import Health, Status
    from edge_retrieval.outputs.history import History
    from edge_retrieval.outputs.metrics import Metrics
    from edge_retrieval.outputs.push import PushHub


class Services(Protocol):
    """The routes' whole view of the device."""

    metrics: Metrics
    history: History | None
    push: PushHub

    def health(self) -> Health:
        """GET /api/health."""
        ...

    def status(self) -> Status:
        """GET /api/status and the page's status events."""
        ...

    def query_image(self, data: bytes, source: str) -> LookupResult:
        """POST /api/query: look up an uploaded image (ImageError, BusyError)."""
        ...

    def latest_result(self) -> LookupResult | None:
        """GET /api/results/latest."""
        ...

    def request_lookup(self) -> None:
        """POST /api/lookup: look up the next camera frame."""
        ...

    def latest_frame_jpeg(self) -> tuple[int, bytes] | None:
        """GET /api/frame.jpg, the live view's first frame: (frame index, JPEG)."""
        ...

    def wait_frame_jpeg(self, after_index: int, timeout_s: float) -> tuple[int, bytes] | None:
        """The live view's next frame after ``after_index``; None after ``timeout_s``."""
        ...

    def enrol(self, data: bytes, label: str, item_id: str | None, *, attributes: dict | None = None,
              replace: bool = False) -> dict:
        """POST /api/catalog: {"id", "label", "attributes", "status": "queued", "seq", "replaced"} (InputError: 409
        for an id in use unless ``replace``; BusyError, DiskFullError)."""
        ...

    def enrol_frame(self, label: str, item_id: str | None, *, attributes: dict | None = None,
                    replace: bool = False) -> dict:
        """POST /api/catalog/camera: enrol the camera's frame, as :meth:`enrol`."""
        ...

    def add_photo(self, item_id: str, data: bytes | None, photo: str | None = None) -> dict:
        """POST /api/catalog/<id>/photos: one more photo (the upload, or the camera's frame when ``data`` is None)."""
        ...

    def remove_photo(self, item_id: str, photo: str) -> dict:
        """DELETE /api/catalog/<id>?photo=NAME: remove one photo of an item."""
        ...

    def item_details(self, item_id: str) -> dict:
        """GET /api/catalog/<id>: {"id", "label", "attributes", "photos": [{"photo", "thumbnail"}]}."""
        ...

    def remove(self, item_id: str) -> bool:
        """DELETE /api/catalog/<id>: every photo of the item; False when unknown."""
        ...

    def thumbnail(self, item_id: str, photo: str = "") -> bytes | None:
        """GET /api/catalog/<id>/thumb.jpg[?photo=NAME]."""
        ...

    def catalog_items(self) -> list[dict]:
        """GET /api/catalog: every item as {"id", "label", "attributes", "photos" (how many)}."""
        ...
