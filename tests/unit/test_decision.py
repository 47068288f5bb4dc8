"""The learned match / no-match decision (edge_retrieval/search/decision.py): its features, its fallback to the two thresholds,
and the config validation of its coefficients. Real lookups with the shipped coefficients are in
tests/test_recognition.py (unknown photos and empty tables → no match, close-ups → the right item)."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from edge_retrieval.core.config import (
    BG_K,
    DEFAULT_BUNDLE,
    OPEN_BUNDLE,
    UNCALIBRATED_ACCEPT_INLIERS,
    RecognitionConfig,
)
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import BundleError, ConfigError
from edge_retrieval.core.results import Candidate
from edge_retrieval.index.reader import CatalogIndex, CatalogItem
from edge_retrieval.index.writer import write_index
from edge_retrieval.model.bundle import BACKGROUND_FILE, load_background, load_manifest, write_background
from edge_retrieval.search.decision import background_level, decision_features, probability
from edge_retrieval.search.lookup import Lookup, resolve_decision

REJECT_ALL = dict(features=["log_inliers"], weights=[0.0], bias=-50.0, threshold=0.5)


@pytest.fixture()
def decide(encoder):
    def _decide(rc: RecognitionConfig, ranked: list[Candidate]):
        return Lookup(encoder, None, rc, top_k=5)._decide(ranked)  # the decision needs no index
    return _decide


def test_features_of_a_verified_lookup():
    ranked = [Candidate("a", "A", 0.8, 15), Candidate("b", "B", 0.85, 3), Candidate("c", "C", 0.5, None)]
    f = decision_features(ranked)
    assert f["score"] == pytest.approx(0.8) and f["score_margin"] == pytest.approx(-0.05)
    assert f["log_inliers"] == pytest.approx(math.log(16))
    assert f["log_inlier_margin"] == pytest.approx(math.log(16) - math.log(4))
    assert f["score_norm"] == pytest.approx(0.8 - 0.5)  # the top item's cosine over the lowest of the first NORM_K
    alone = decision_features([Candidate("a", "A", 0.7, None)])
    assert alone == {"score": pytest.approx(0.7), "score_margin": pytest.approx(0.7), "log_inliers": 0.0,
                     "log_inlier_margin": 0.0, "score_norm": pytest.approx(0.7), "score_bg": pytest.approx(0.7)}
    assert decision_features(ranked, background=0.6)["score_bg"] == pytest.approx(0.8 - 0.6)


def test_the_model_decides_verified_lookups_and_the_thresholds_the_rest(decide):
    _decide = decide
    verified = [Candidate("a", "A", 0.9, 60), Candidate("b", "B", 0.2, 0)]
    unverified = [Candidate("a", "A", 0.9), Candidate("b", "B", 0.2)]
    strict = RecognitionConfig(decision=REJECT_ALL)
    assert _decide(strict, verified) is None  # the model, not accept_inliers, says no
    assert _decide(strict, unverified).id == "a"  # nothing verified: cosine ≥ accept_score
    assert _decide(strict.model_copy(update={"decision": None}), verified).id == "a"  # no model: thresholds
    assert _decide(RecognitionConfig(decision=None, accept_inliers=100, accept_score=0.95), verified) is None
    assert _decide(strict, []) is None


def test_the_default_bundle_decides_by_two_thresholds():
    # bench calibrate: for SSCD the learned decision gained nothing held out over the two thresholds, and its
    # margin features accepted an unknown photo in a small catalog (margins grow as a catalog thins out)
    cal = load_manifest(DEFAULT_BUNDLE, verify_sha=False).calibration
    assert cal.decision is None and cal.accept_inliers >= UNCALIBRATED_ACCEPT_INLIERS and 0 < cal.accept_score < 1
    assert resolve_decision(RecognitionConfig(), cal) == (None, cal.accept_inliers, cal.accept_score)


def test_the_open_bundle_carries_a_documented_decision_that_behaves():
    cal = load_manifest(OPEN_BUNDLE, verify_sha=False).calibration
    model, inliers, score = resolve_decision(RecognitionConfig(), cal)
    assert model is cal.decision and model.fitted_on and (inliers, score) == (cal.accept_inliers, cal.accept_score)
    sure = decision_features([Candidate("a", "A", 0.8, 80), Candidate("b", "B", 0.3, 2)])
    nothing = decision_features([Candidate("a", "A", 0.3, 0), Candidate("b", "B", 0.29, 0)])
    assert probability(model, sure) >= model.threshold > probability(model, nothing)


def test_the_config_overrides_the_bundle_and_an_uncalibrated_bundle_accepts_on_points_only():
    cal = load_manifest(OPEN_BUNDLE, verify_sha=False).calibration
    assert resolve_decision(RecognitionConfig(decision=None, accept_score=0.9), cal) == (None, cal.accept_inliers, 0.9)
    model, inliers, score = resolve_decision(RecognitionConfig(), None)
    assert model is None and inliers == UNCALIBRATED_ACCEPT_INLIERS and score > 1.0  # never on a cosine alone


def _write(tmp_path, text: str):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_decision_config_is_validated(tmp_path):
    ok = load_config(_write(tmp_path, "recognition:\n  decision:\n    features: [score, log_inliers]\n"
                                      "    weights: [2.0, 1.5]\n    bias: -4\n    threshold: 0.6\n"))
    assert ok.recognition.decision.weights == [2.0, 1.5] and ok.recognition.decision.threshold == 0.6
    assert load_config(_write(tmp_path, "recognition:\n  decision: null\n")).recognition.decision is None
    assert load_config(_write(tmp_path, "recognition:\n  decision: bundle\n")).recognition.decision == "bundle"
    bad = {
        "weights: [1.0]\n    bias: 0\n    threshold: 0.5": r"1 weights for 2 features",
        "weights: [1.0, 2.0]\n    bias: 0\n    threshold: 1.5": r"recognition\.decision\.threshold",
        "weights: [1.0, .nan]\n    bias: 0\n    threshold: 0.5": r"finite",
    }
    for rest, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path, f"recognition:\n  decision:\n    features: [score, log_inliers]\n    {rest}\n"))
    with pytest.raises(ConfigError, match=r"recognition\.decision\.features\.0.*'score'"):
        load_config(_write(tmp_path, "recognition:\n  decision:\n    features: [cosine]\n    weights: [1]\n"
                                     "    bias: 0\n    threshold: 0.5\n"))
    with pytest.raises(ConfigError, match=r"recognition\.decision\.bias: Field required"):
        load_config(_write(tmp_path, "recognition:\n  decision:\n    features: [score]\n    weights: [1]\n"
                                     "    threshold: 0.5\n"))


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def bg_bundle(tmp_path_factory, encoder):
    """A copy of the open bundle with a background set of 300 vectors (random directions, as the real set's
    photos are unrelated to the test catalog), and its encoder."""
    from edge_retrieval.model.encoder import Encoder
    d = tmp_path_factory.mktemp("bundle")
    for f in encoder.bundle_dir.iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    rng = np.random.default_rng(3)
    write_background(d, _unit(rng.standard_normal((300, encoder.dim))), {"made_by": "test"})
    with Encoder.from_bundle(d, num_threads=1) as enc:
        yield enc


def test_score_bg_means_the_same_whatever_the_catalog_holds(tmp_path, bg_bundle, photos):
    # one real query; the catalog holds its item (a near copy of its descriptor) and 10 or 1000 unrelated items
    frame = photos["coffee"]
    q = bg_bundle.embed(frame)
    rng = np.random.default_rng(0)
    target = _unit(q + 0.3 * np.linalg.norm(q) / np.sqrt(q.size) * rng.standard_normal(q.size))
    # unrelated items that still resemble the query a little (a catalog of photos is not orthogonal to it)
    others = _unit(0.25 * q + rng.standard_normal((1000, q.size)) / np.sqrt(q.size))
    features = {}
    for extra in (10, 1000):
        items = [CatalogItem("item", "Item", target)] + [CatalogItem(f"x{i}", "X", v) for i, v in enumerate(others[:extra])]
        write_index(tmp_path / str(extra), items, bundle_sha256=bg_bundle.sha256, n_trees=4)
        with CatalogIndex.load(tmp_path / str(extra), expected_bundle_sha256=bg_bundle.sha256) as idx:
            look = Lookup(bg_bundle, idx, RecognitionConfig(adapt=False, verify=False, decision=None), top_k=10)
            res = look.lookup_rgb(frame)
            assert res.results[0].id == "item"
            features[extra] = decision_features(res.results, look._background_level(q, idx))
    assert features[10]["score"] == pytest.approx(features[1000]["score"], abs=1e-4)
    assert features[10]["score_bg"] == pytest.approx(features[1000]["score_bg"], abs=1e-4)
    # the catalog-relative normalisation moves with what else the catalog holds
    assert abs(features[10]["score_norm"] - features[1000]["score_norm"]) > 0.02


def test_background_level_is_the_kth_best_cosine():
    bg = _unit(np.random.default_rng(1).standard_normal((50, 8)))
    q = bg[0] + 0.01
    sims = np.sort(bg @ q)[::-1]
    assert background_level(q, bg) == pytest.approx(sims[BG_K - 1])
    assert background_level(q, bg[:3]) == pytest.approx(np.sort(bg[:3] @ q)[0])  # fewer rows than BG_K: the last


def test_a_background_is_checked_and_a_model_that_needs_one_is_refused_without(bg_bundle, encoder, tmp_path):
    assert load_background(bg_bundle.bundle_dir, bg_bundle.manifest).shape == (300, encoder.dim)
    assert load_background(encoder.bundle_dir, encoder.manifest) is None
    needs_bg = RecognitionConfig(decision=dict(features=["score_bg"], weights=[10.0], bias=-3.0, threshold=0.5))
    with pytest.raises(ConfigError, match="score_bg.*no background set"):
        Lookup(encoder, None, needs_bg, top_k=5)
    assert Lookup(bg_bundle, None, needs_bg, top_k=5).decision.features == ["score_bg"]
    broken = tmp_path / "b"
    shutil.copytree(bg_bundle.bundle_dir, broken)
    np.save(broken / BACKGROUND_FILE, np.zeros((300, encoder.dim), np.float16))
    with pytest.raises(BundleError, match="sha256"):
        load_background(broken, load_manifest(broken, verify_sha=False))
