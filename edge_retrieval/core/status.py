"""The typed health and status documents: what ``GET /api/health`` and ``GET /api/status`` answer, what MQTT
publishes as the device's state and what the page's event stream compares — one model each, so every reader
uses attributes the type checker knows, not string keys that can drift.

``Health`` is the full picture (camera, bundle, index, verification, adaptation, catalog store); ``Status`` the
small document the page's status panel polls. Parts only displayed (verification, adaptation) stay
free-form dicts, written by their owners and read by nobody else."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, model_serializer


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraStatus(_Doc):
    """edge_retrieval/capture/camera.py: its state (``starting`` | ``streaming`` | ``reconnecting`` | ``stopped``; ``absent``
    on an appliance without a camera), the source (credentials redacted), frames, the
    measured fps, the age of the newest frame, reconnects and the last capture error."""

    state: str
    spec: Optional[str] = None
    frames_total: int = 0
    fps: float = 0.0
    last_frame_age_s: Optional[float] = None
    reconnects: int = 0
    last_error: Optional[str] = None


ABSENT_CAMERA = CameraStatus(state="absent")


class BundleInfo(_Doc):
    """The model bundle that runs (edge_retrieval/model/encoder.py): its manifest's facts, the runtime, and why it is the
    fallback bundle when it is (``fallback_reason``, None when the configured bundle runs)."""

    name: str
    path: str
    sha256: str
    quantization: str
    backbone: Optional[str] = None
    output_dim: int
    format: str
    input: str
    runtime: str
    num_threads: int
    licence: str = ""
    fallback_reason: Optional[str] = None


class ErrorInfo(_Doc):
    """The last error the status panel shows: its kind (an error class, ``internal``, ``catalog``), a message
    and when (epoch seconds)."""

    kind: str
    message: str
    timestamp: Optional[float] = None


class IndexHealth(_Doc):
    """The live catalog index: items, generation (None before the first), folder, Annoy trees and search_k; the base
    generation's items, the delta beside it (items enrolled and removed since; edge_retrieval/index/delta.py), the
    size that starts a merge, whether one runs, the last one and why the last one failed."""

    size: int
    photos: Optional[int] = None  # entries: an item with several photos counts each
    generation: Optional[str] = None
    path: str
    n_trees: int
    search_k: int
    base_size: Optional[int] = None
    delta_items: int = 0
    delta_removed: int = 0
    merge_after_items: Optional[int] = None
    merging: bool = False
    last_merge: Optional[dict[str, Any]] = None
    merge_error: Optional[str] = None


class IndexSummary(_Doc):
    """Items and generation of the live index (the status panel; a change is a ``catalog_changed`` event); the
    generation reads ``gen-000007+3`` when 3 catalog changes are in the delta beside the base ``gen-000007``."""

    size: int
    generation: Optional[str] = None


class CatalogHealth(_Doc):
    """The catalog store and its replay onto the index (edge_retrieval/catalog/service.py): the store file, its newest
    change and the one the live index holds, acknowledged enrolments not indexed yet, enrolled items and
    tombstones kept, the last rebuild error, what the first replay of this start did and skipped, the migration
    of an older ``enrolled_dir``, damaged generations set aside, and the last encoded copies of enrolments found
    damaged (encoded again from their originals)."""

    store: str
    seq: int
    applied_seq: int
    pending: int
    enrolled: int
    removed: int
    last_error: Optional[str] = None
    reconciled_at_start: Optional[int] = None
    removals_applied_at_start: Optional[int] = None
    skipped: list[dict[str, str]] = []
    migrated: Optional[dict[str, Any]] = None
    set_aside: list[dict[str, Any]] = []
    store_went_back: Optional[dict[str, Any]] = None  # the store was behind the index at start (store.py)
    store_read_only: Optional[str] = None  # why the store only reads (a full disk at start) until space is back
    damaged_encodings: list[dict[str, Any]] = []


class TriggerStatus(_Doc):
    """Whether the motion/stillness trigger runs, and its last measurements (edge_retrieval/capture/trigger.py); its JSON
    leaves out what was not measured."""

    enabled: bool
    motion: Optional[float] = None
    sharpness: Optional[float] = None
    armed: Optional[bool] = None
    still_for_s: Optional[float] = None

    @model_serializer(mode="wrap")
    def _measured_only(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ProcessStatus(_Doc):
    """CPU (percent of one core, since the previous reading) and resident memory of this process."""

    cpu_percent: Optional[float] = None
    rss_mb: Optional[float] = None


class LatestLookup(_Doc):
    """When the latest lookup ran and its history number (None before the first / without a history)."""

    timestamp: Optional[float] = None
    n: Optional[int] = None


class Health(_Doc):
    """``GET /api/health``: 200 when ``ok`` (the camera streams, or there is none), else 503."""

    ok: bool
    camera: CameraStatus
    bundle: BundleInfo
    index: IndexHealth
    verification: dict[str, Any]
    adaptation: dict[str, Any]
    uptime_s: float
    trigger: Optional[TriggerStatus] = None
    enrolled: CatalogHealth

    def to_json(self) -> dict:
        """The JSON document (no ``trigger`` key on an appliance without a trigger)."""
        return self.model_dump(mode="json", exclude={"trigger"} if self.trigger is None else None)


class Status(_Doc):
    """``GET /api/status`` and the ``status`` event: what the page's status panel shows."""

    camera: CameraStatus
    trigger: TriggerStatus
    looking_up: bool
    lookups_per_min: int
    last_error: Optional[ErrorInfo] = None
    process: ProcessStatus
    index: IndexSummary
    verification: dict[str, Any]
    latest: LatestLookup
    uptime_s: float

    def to_json(self) -> dict:
        """The JSON document."""
        return self.model_dump(mode="json")
