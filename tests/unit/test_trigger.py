"""edge_retrieval/capture/trigger.py: fire once per settled, sharp, new view; time is driven explicitly."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from edge_retrieval.capture.trigger import Trigger
from edge_retrieval.core.config import TriggerConfig

FPS = 10
DT_S = 1.0 / FPS


def _frame(photo: np.ndarray, size_px=(320, 240)) -> np.ndarray:
    return cv2.resize(photo, size_px, interpolation=cv2.INTER_AREA)


PHOTO_A = _frame(data.astronaut())
PHOTO_B = _frame(data.coffee())


def _feed(trigger: Trigger, frames, t0_s: float) -> tuple[list[tuple[float, str]], float]:
    """Feed frames at 10 fps from t0_s; return [(time, reason)] of firings and the next time."""
    fired = []
    t_s = t0_s
    for rgb in frames:
        reason = trigger.update(rgb, t_s)
        if reason is not None:
            fired.append((round(t_s, 3), reason))
        t_s += DT_S
    return fired, t_s


def _moving(photo: np.ndarray, n: int) -> list[np.ndarray]:
    return [np.roll(photo, 12 * (i + 1), axis=1) for i in range(n)]


def test_still_view_fires_once_then_not_while_moving_then_new_view_fires():
    trigger = Trigger(TriggerConfig())
    fired, t = _feed(trigger, [PHOTO_A] * 10, 0.0)  # 1 s still
    assert fired == [(0.5, "still")]  # after still_time_s = 0.5
    assert trigger.last_metrics["armed"] is False

    fired, t = _feed(trigger, [PHOTO_A] * 30, t)  # staying still longer
    assert fired == []

    fired, t = _feed(trigger, _moving(PHOTO_A, 20), t)  # panning: changed but never still
    assert fired == []
    assert trigger.last_metrics["armed"] is True and trigger.last_metrics["motion"] > 3.0

    fired, t = _feed(trigger, [PHOTO_B] * 10, t)
    assert [reason for _, reason in fired] == ["still"]
    m = trigger.last_metrics
    assert set(m) == {"motion", "sharpness", "armed", "still_for_s"} and m["sharpness"] >= 60.0


def test_returning_to_the_same_view_does_not_refire_without_change():
    trigger = Trigger(TriggerConfig())
    fired, t = _feed(trigger, [PHOTO_A] * 10, 0.0)
    assert len(fired) == 1
    # A tiny wobble (below motion_threshold vs the fired frame) does not re-arm.
    wobble = np.clip(PHOTO_A.astype(int) + 2, 0, 255).astype(np.uint8)
    fired, _ = _feed(trigger, [wobble] * 5 + [PHOTO_A] * 20, t)
    assert fired == []


def test_blurred_still_view_does_not_fire():
    blurred = cv2.GaussianBlur(PHOTO_A, (0, 0), sigmaX=8)
    trigger = Trigger(TriggerConfig())
    fired, _ = _feed(trigger, [blurred] * 20, 0.0)
    assert fired == []
    blur_sharpness = trigger.last_metrics["sharpness"]
    assert blur_sharpness < 60.0
    # The same frames fire once the sharpness bar is below them: the blur was the only reason.
    trigger = Trigger(TriggerConfig(min_sharpness=blur_sharpness * 0.5))
    fired, _ = _feed(trigger, [blurred] * 20, 0.0)
    assert [reason for _, reason in fired] == ["still"]


def test_request_fires_on_next_update_regardless_of_state():
    trigger = Trigger(TriggerConfig())
    moving = _moving(PHOTO_A, 10)
    fired, t = _feed(trigger, moving[:5], 0.0)
    assert fired == []
    trigger.request()
    assert trigger.update(moving[5], t) == "requested"  # moving, and not still for long
    assert trigger.update(moving[6], t + DT_S) is None  # one request, one lookup
    trigger.request()
    assert trigger.update(moving[7], t + 2 * DT_S) == "requested"  # min_interval_s does not apply


def test_min_interval_between_automatic_lookups():
    trigger = Trigger(TriggerConfig(still_time_s=0.0, min_interval_s=2.0))
    # Alternating views: every frame is a new view (re-arms), still_time 0 makes each eligible.
    frames = [PHOTO_A if i % 2 == 0 else PHOTO_B for i in range(50)]
    fired, _ = _feed(trigger, frames, 0.0)
    times = [t for t, _ in fired]
    assert times[0] == 0.0 and len(times) >= 2
    assert all(b - a >= 2.0 - 1e-9 for a, b in zip(times, times[1:]))


def test_frame_size_change_and_config_validation():
    trigger = Trigger(TriggerConfig())
    _feed(trigger, [PHOTO_A] * 10, 0.0)
    small = _frame(data.astronaut(), (200, 100))  # camera came back at another resolution/aspect
    fired, _ = _feed(trigger, [small] * 10, 5.0)
    assert [reason for _, reason in fired] == ["still"]
    with pytest.raises(ValueError, match="still_time_s"):
        TriggerConfig(still_time_s=-1)
    with pytest.raises(ValueError):
        trigger.update(np.zeros((10, 10), np.uint8), 9.0)


def test_a_folder_camera_holds_each_image_long_enough_to_be_looked_up_once(tmp_path, photos, encoder):
    """A folder as the camera (config as a user writes it): each image stays in view for camera.hold_s, so the
    real trigger sees a still view and the appliance looks each print up once, in the folder's order. (With
    hold_s: 0, each image one frame, the trigger never fires: nothing is looked up.)"""
    import time

    from edge_retrieval.app.wiring import build_appliance, prepare_catalog
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.imaging.codec import encode_jpeg
    from tests.conftest import view

    (tmp_path / "catalog").mkdir()
    (tmp_path / "frames").mkdir()
    names = ("rocket", "moon", "brick")
    for i, name in enumerate(names, 1):
        (tmp_path / "catalog" / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 92))
        (tmp_path / "frames" / f"{i}_{name}.jpg").write_bytes(encode_jpeg(view(photos, name, "closeup", seed=i), 92))
    (tmp_path / "config.yaml").write_text("""
camera: {source: frames, fps: 10, hold_s: 1.5}
trigger: {enabled: true}
encoder: {bundle: efficientnet-lite0, num_threads: 1}
index: {path: var/catalog}
catalog: {build_from: catalog, store: var/catalog.sqlite}
history: {dir: var/history}
build: {workers: 1}
recognition: {adapt: false, accept_inliers: 16, accept_score: 0.74, decision: null}
""")
    cfg = prepare_catalog(load_config(tmp_path / "config.yaml"), encoder)
    app = build_appliance(cfg, encoder).start()
    try:
        deadline = time.monotonic() + 60  # a bounded wait, not a timing: three images take ~4.5 s
        while time.monotonic() < deadline and len(app.history.entries()) < 3:
            time.sleep(0.1)
        seen = [e.result for e in reversed(app.history.entries())][:3]
    finally:
        app.stop()
    assert [r.source for r in seen] == ["camera"] * 3  # the trigger fired: no button, no upload
    assert [r.match.id if r.match else None for r in seen] == list(names)
