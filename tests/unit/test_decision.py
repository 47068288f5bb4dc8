"""The learned match / no-match decision (edge_retrieval/search/decision.py): its features, its fallback to the two thresholds,
and the config validation of its coefficients. Real lookups with the shipped coefficients are in
tests/test_recognition.py (unknown photos and empty tables → no match, close-ups → the right item)."""
from __future__ import annotations

import math

import pytest

from edge_retrieval.core.config import (
    DEFAULT_BUNDLE,
    OPEN_BUNDLE,
    UNCALIBRATED_ACCEPT_INLIERS,
    RecognitionConfig,
)
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import ConfigError
from edge_retrieval.core.results import Candidate
from edge_retrieval.model.bundle import load_manifest
from edge_retrieval.search.decision import decision_features, probability
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
                     "log_inlier_margin": 0.0, "score_norm": pytest.approx(0.7)}


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
