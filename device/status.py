"""The typed health and status documents: what ``GET /api/health`` and ``GET /api/status`` answer, what MQTT
publishes as the device's state and what the page's event stream compares — one model each, so every reader
uses attributes the type checker knows, not string keys that can drift.

``Health`` is the full picture (camera, bundle, index, verification, adaptation, catalog store); ``Status`` the
small document the page's status panel polls. Parts only displayed (the bundle's facts, the store's counts) stay
free-form dicts, written by their owners."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraStatus(_Doc):
    """device/camera.py: its state (``starting`` | ``streaming`` | ``reconnecting`` | ``stopped``; ``absent``
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


class ErrorInfo(_Doc):
    """The last error the status panel shows: its kind (an error class, ``internal``, ``catalog``), a message
    and when (epoch seconds)."""

    kind: str
    message: str
    timestamp: Optional[float] = None


class IndexHealth(_Doc):
    """The live catalog index: items, generation (None before the first), folder, Annoy trees and search_k."""

    size: int
    generation: Optional[str] = None
    path: str
    n_trees: int
    search_k: int


class IndexSummary(_Doc):
    """Items and generation of the live index (the status panel; a change is a ``catalog_changed`` event)."""

    size: int
    generation: Optional[str] = None


class TriggerStatus(_Doc):
    """Whether the motion/stillness trigger runs, and its last measurements (device/trigger.py); its JSON
    leaves out what was not measured."""

    enabled: bool
    motion: Optional[float] = None
    sharpness: Optional[float] = None
    armed: Optional[bool] = None
    still_for_s: Optional[float] = None


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
    bundle: dict[str, Any]
    index: IndexHealth
    verification: dict[str, Any]
    adaptation: dict[str, Any]
    uptime_s: float
    trigger: Optional[TriggerStatus] = None
    enrolled: dict[str, Any]

    def to_json(self) -> dict:
        """The JSON document (no ``trigger`` key on an appliance without a trigger)."""
        out = self.model_dump(mode="json", exclude={"trigger"})
        if self.trigger is not None:
            out["trigger"] = self.trigger.model_dump(mode="json", exclude_none=True)
        return out


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
        return {**self.model_dump(mode="json"), "trigger": self.trigger.model_dump(mode="json", exclude_none=True)}
