"""The match / no-match decision of one verified lookup: a small logistic regression over what the lookup
already knows (the adapted cosine of the top item, its margin to the runner-up, the verified inliers of the top
item and their margin to the best other verified item), instead of two fixed thresholds.

Why a model: the two thresholds each look at one number, so a top item with 7 clean inliers and a wide cosine
margin is rejected while one with 9 inliers on a crowded shortlist (a hard negative, another crop of the same
photo) is accepted. The margins carry that evidence. ``python -m benchmarks calibrate`` fits the coefficients on the
camera-view benchmark (docs/benchmarks.md; how to refit on one's own catalog is there too) and
``RecognitionConfig.decision`` holds them; numpy only at run time.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edge_retrieval.core.config import NORM_K, DecisionModel
from edge_retrieval.core.results import Candidate


def _log_inliers(c: Candidate | None) -> float:
    return math.log1p(max(c.inliers or 0, 0)) if c is not None else 0.0


def decision_features(ranked: Sequence[Candidate]) -> dict[str, float]:
    """Every feature a DecisionModel may name, from the ranked candidates of one lookup (best first, after
    verification). ``score`` is the top item's cosine (adapted when the index is), ``score_margin`` its lead over
    the best other cosine; ``log_inliers`` is log(1 + inliers) of the top item and ``log_inlier_margin`` its lead
    over the best other verified item (log scale: 8 → 16 inliers means more than 80 → 88). ``score_norm`` is the
    top cosine minus the ``NORM_K``-th best cosine of the lookup (SSCD's score normalisation, the catalog standing
    in for its background set): how far the top item stands out from what this query resembles anyway."""
    top, rest = ranked[0], list(ranked[1:])
    runner = max(rest, key=lambda c: c.inliers or 0, default=None)
    other_score = max((c.score for c in rest), default=0.0)
    cosines = sorted((c.score for c in ranked), reverse=True)
    kth = cosines[min(NORM_K, len(cosines)) - 1] if len(cosines) > 1 else 0.0
    return {"score": float(top.score), "score_margin": float(top.score - other_score),
            "log_inliers": _log_inliers(top), "log_inlier_margin": _log_inliers(top) - _log_inliers(runner),
            "score_norm": float(top.score - kth)}


def probability(model: DecisionModel, features: dict[str, float]) -> float:
    """P(the top item is the right one) under ``model`` for one lookup's features."""
    x = np.array([features[name] for name in model.features], dtype=np.float64)
    z = float(x @ np.asarray(model.weights, dtype=np.float64) + model.bias)
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def accepts(model: DecisionModel, ranked: Sequence[Candidate]) -> bool:
    """Whether ``model`` accepts the top item of a verified lookup (``ranked`` not empty)."""
    return probability(model, decision_features(ranked)) >= model.threshold
