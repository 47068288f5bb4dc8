"""The device side of patch descriptors, without TensorFlow: patches cut at ORB keypoints follow the keypoint's
orientation and size (a rotated, scaled view gives the same patch), and float descriptors go through the same
ratio test and homography verification as ORB, by L2 distance."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.model.bundle import InputSpec
from edge_retrieval.model.local_features import Features, match_inliers, ratio_matches
from edge_retrieval.model.patch_descriptors import keypoint_patches

CFG = RecognitionConfig()


def test_a_patch_follows_the_keypoint_frame(photos):
    """The patch at (x, y, size, angle) of a photo equals the patch at the mapped keypoint of a copy rotated by
    30° and scaled by 0.8; a patch at the unrotated angle does not."""
    gray = cv2.cvtColor(photos["astronaut"], cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 30, 0.8)  # cv2: +30° turns the picture counter-clockwise
    warped = cv2.warpAffine(gray, m, (w, h))
    rng = np.random.default_rng(0)
    xy = rng.uniform(180, 330, (40, 2)).astype(np.float32)
    size = rng.uniform(30, 60, 40)
    angle = rng.uniform(0, 360, 40)
    xy2 = (xy @ m[:, :2].T + m[:, 2]).astype(np.float32)
    # counter-clockwise on screen is clockwise in image coordinates (y down): a keypoint angle goes down by 30°
    a = keypoint_patches(gray, xy, size, angle, 32, 1.0).astype(np.float32)
    b = keypoint_patches(warped, xy2, size * 0.8, angle - 30, 32, 1.0).astype(np.float32)
    c = keypoint_patches(warped, xy2, size * 0.8, angle, 32, 1.0).astype(np.float32)
    assert a.shape == (40, 32, 32)
    err_same = np.abs(a - b).mean()
    err_unturned = np.abs(a - c).mean()
    assert err_same < 6.0, err_same
    assert err_unturned > 2.5 * err_same, (err_same, err_unturned)


def test_no_keypoints_give_no_patches(photos):
    out = keypoint_patches(np.zeros((50, 50), np.uint8), np.zeros((0, 2), np.float32), np.zeros(0), np.zeros(0), 32, 1.0)
    assert out.shape == (0, 32, 32)


def test_float_descriptors_match_by_l2_and_verify():
    """Float descriptors of points that a known homography maps onto each other verify with (nearly) all of them;
    the same descriptors shuffled against the points do not."""
    rng = np.random.default_rng(1)
    n = 120
    xy = rng.uniform(0, 400, (n, 2)).astype(np.float32)
    desc = rng.normal(size=(n, 64)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    h = np.array([[0.9, 0.1, 20], [-0.1, 0.9, 35], [0.0002, 0.0001, 1]])
    mapped = cv2.perspectiveTransform(xy.reshape(-1, 1, 2).astype(np.float64), h).reshape(-1, 2).astype(np.float32)
    noisy = (desc + rng.normal(scale=0.05, size=desc.shape)).astype(np.float32)
    query = Features(xy, desc, (400, 400))
    cand = Features(mapped, noisy, (450, 450))
    pairs = ratio_matches(query, cand, CFG)
    assert len(pairs) >= 0.95 * n and (pairs[:, 0] == pairs[:, 1]).all()
    assert match_inliers(query, cand, CFG) >= 0.9 * n
    shuffled = Features(mapped[rng.permutation(n)], noisy, (450, 450))
    assert match_inliers(query, shuffled, CFG) < 10


def test_a_one_channel_input_is_grayscale():
    """A patch bundle's input is 1-channel GRAY; channels and colour order must agree."""
    assert InputSpec(height=32, width=32, channels=1, color_order="GRAY").channels == 1
    with pytest.raises(ValidationError, match="GRAY"):
        InputSpec(height=32, width=32, channels=1)
    with pytest.raises(ValidationError, match="GRAY"):
        InputSpec(height=32, width=32, color_order="GRAY")
