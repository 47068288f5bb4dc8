"""When a camera frame is worth a lookup: the view has settled, is sharp, and is new.

Pure numpy + OpenCV, no threads and no clock of its own: the caller passes ``now_s`` so behaviour is
deterministic and testable. All measures are taken on a small grayscale copy of the frame.
"""
from __future__ import annotations

import cv2
import numpy as np

from edge_retrieval.core.config import TriggerConfig


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 255.0  # the resolution changed (camera reconnected): certainly a different view
    return float(cv2.absdiff(a, b).mean())


class Trigger:
    """Decides, frame by frame, when to run a lookup.

    Armed at start. When armed, it fires ("still") once the view has been still for
    ``still_time_s``, is sharp enough and ``min_interval_s`` has passed since the last lookup; it is
    then disarmed until the view differs from the frame at that lookup by more than
    ``motion_threshold``. ``request()`` makes the next ``update`` fire ("requested") unconditionally.
    """

    def __init__(self, cfg: TriggerConfig):
        self.cfg = cfg
        self._armed = True
        self._requested = False
        self._prev: np.ndarray | None = None
        self._reference: np.ndarray | None = None  # small gray frame at the last lookup
        self._still_since_s: float | None = None
        self._last_fire_s: float | None = None
        self.last_metrics: dict = {"motion": 0.0, "sharpness": 0.0, "armed": True, "still_for_s": 0.0}

    def request(self) -> None:
        """Ask for a lookup on the next frame, whatever the motion, sharpness or interval."""
        self._requested = True  # a bool store is atomic: safe to call from the web thread

    def update(self, rgb: np.ndarray, now_s: float) -> str | None:
        """Feed one RGB frame captured at ``now_s`` (seconds, monotonic). Returns "requested" or
        "still" when a lookup should run on this frame, else None. Updates ``last_metrics``."""
        small = self._analysis_gray(rgb)
        cfg = self.cfg

        motion = 0.0 if self._prev is None else _mean_abs_diff(small, self._prev)
        if self._prev is None or motion >= cfg.still_threshold:
            self._still_since_s = now_s  # a still run starts with this frame
        self._prev = small
        still_for_s = now_s - self._still_since_s

        if not self._armed and self._reference is not None:
            if _mean_abs_diff(small, self._reference) > cfg.motion_threshold:
                self._armed = True
                self._reference = None

        sharpness = float(cv2.Laplacian(small, cv2.CV_64F).var())

        reason = None
        if self._requested:
            reason = "requested"
        elif (
            self._armed
            and still_for_s >= cfg.still_time_s
            and sharpness >= cfg.min_sharpness
            and (self._last_fire_s is None or now_s - self._last_fire_s >= cfg.min_interval_s)
        ):
            reason = "still"
        if reason is not None:
            self._requested = False
            self._armed = False
            self._reference = small
            self._last_fire_s = now_s

        self.last_metrics = {
            "motion": round(motion, 3),
            "sharpness": round(sharpness, 1),
            "armed": self._armed,
            "still_for_s": round(still_for_s, 3),
        }
        return reason

    def _analysis_gray(self, rgb: np.ndarray) -> np.ndarray:
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB HxWx3 frame, got shape {rgb.shape}")
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        height, width = gray.shape
        target_w = self.cfg.analysis_width_px
        if width > target_w:
            target_h = max(1, round(height * target_w / width))
            gray = cv2.resize(gray, (target_w, target_h), interpolation=cv2.INTER_AREA)
        return gray
