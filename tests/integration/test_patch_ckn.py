"""Patch-CKN for real and offline: one converter command trains a small CKN without labels on a folder of real
photos and writes its bundle; the device-side PatchDescriber loads it, and the descriptors of a keypoint patch and
of the same spot in a rotated, scaled, brighter copy of the photo are much closer than those of two different
patches. Training photos and rated photos are different (scikit-image / scikit-learn photos)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from edge_retrieval.convert import __main__ as cli  # noqa: E402
from edge_retrieval.core.config import RecognitionConfig  # noqa: E402
from edge_retrieval.core.errors import BundleError  # noqa: E402
from edge_retrieval.imaging.codec import encode_jpeg  # noqa: E402
from edge_retrieval.model.bundle import PATCH_DESCRIPTOR, load_manifest  # noqa: E402
from edge_retrieval.model.encoder import Encoder  # noqa: E402
from edge_retrieval.model.patch_descriptors import PatchDescriber, orb_keypoints  # noqa: E402

TRAIN = ("coins", "page", "brick", "grass", "hubble_deep_field", "immunohistochemistry", "clock", "moon")
RATED = ("astronaut", "coffee", "chelsea", "rocket", "camera", "china")
CFG = RecognitionConfig()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, photos):
    """A 2-layer CKN (16 filters, 40k pairs) trained on 8 photos: about 15 s on 2 cores."""
    root = tmp_path_factory.mktemp("ckn")
    train = root / "train"
    train.mkdir()
    for name in TRAIN:
        (train / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 92))
    (train / "notes.txt").write_text("not an image")
    out = root / "bundle"
    rc = cli.main(["patch-ckn", "--train-images", str(train), "--out", str(out), "--filters", "16",
                   "--pairs", "40000", "--views-per-image", "2", "--pca", "64"])
    assert rc == 0
    return out


def _paired_keypoints(img: np.ndarray, angle: float, scale: float, gain: float):
    """ORB keypoints of ``img`` and of a rotated, scaled, brighter copy, paired where the copy's keypoint lies
    within 1.5 px of the mapped original at about the same size: (gray, kps, warped gray, kps)."""
    gray0, kps0, _ = orb_keypoints(img, CFG, compute_orb=False)
    h, w = gray0.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    warped = cv2.warpAffine(cv2.resize(img, (w, h)), m, (w, h), borderMode=cv2.BORDER_REFLECT)
    warped = np.clip(warped.astype(np.float32) * gain + 10, 0, 255).astype(np.uint8)
    gray1, kps1, _ = orb_keypoints(warped, CFG, compute_orb=False)
    p0 = np.array([k.pt for k in kps0]) @ m[:, :2].T + m[:, 2]
    p1 = np.array([k.pt for k in kps1])
    dist = np.linalg.norm(p0[:, None] - p1[None], axis=2)
    j = dist.argmin(1)
    size_ratio = np.array([k.size for k in kps0]) * scale / np.array([kps1[i].size for i in j])
    ok = np.flatnonzero((dist[np.arange(len(p0)), j] < 1.5) & (np.abs(np.log(size_ratio)) < 0.3))
    return gray0, [kps0[i] for i in ok], gray1, [kps1[j[i]] for i in ok]


def test_warped_patch_is_closer_than_another_patch(bundle, photos):
    describer = PatchDescriber(bundle)
    same, other, wins = [], [], []
    for name, (angle, scale, gain) in zip(RATED, [(15, 0.9, 1.2), (-20, 1.1, 0.8), (10, 0.85, 1.1),
                                                  (25, 1.0, 1.3), (-10, 0.9, 0.9), (20, 1.15, 1.0)]):
        gray0, k0, gray1, k1 = _paired_keypoints(photos[name], angle, scale, gain)
        assert len(k0) >= 40, name
        a, b = describer.features_at(gray0, k0).desc, describer.features_at(gray1, k1).desc
        shifted = np.roll(b, 1, axis=0)  # another keypoint's patch of the same copy
        d_same, d_other = np.linalg.norm(a - b, axis=1), np.linalg.norm(a - shifted, axis=1)
        same.append(d_same.mean())
        other.append(d_other.mean())
        wins.append(np.mean(d_same < d_other))
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-3)
    # seen: same ≈ 0.35, other ≈ 1.25, the warped copy nearer for ≈ 97 % of the patches
    assert np.mean(same) < 0.5 * np.mean(other), (same, other)
    assert min(wins) > 0.85, wins


def test_manifest_states_the_contract_and_the_device_encoder_refuses_it(bundle):
    man = load_manifest(bundle)
    assert man.source["descriptor"] == PATCH_DESCRIPTOR and man.output_dim == 64
    assert (man.input.height, man.input.width, man.input.channels, man.input.color_order) == (32, 32, 1, "GRAY")
    assert man.source["patch"]["patch_px"] == 32 and man.source["ckn_layer"]["filters"] == 16
    # the fit lowered the kernel approximation error below k-means + NNLS's
    assert man.source["ckn_layer"]["kernel_rel_error_sgd"] < man.source["ckn_layer"]["kernel_rel_error_kmeans_nnls"]
    assert man.training_images["count"] == len(TRAIN) and man.training_images["skipped"] == 1
    assert "8 other images" in man.licence["summary"]
    rep = json.loads((bundle / "report.json").read_text())
    assert rep["cosine_min"] > 0.999  # float32 export = the Keras model
    with pytest.raises(BundleError, match="patch descriptor"):
        Encoder.from_bundle(bundle)
