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

from edge_retrieval.core.config import BG_K, NORM_K, DecisionModel
from edge_retrieval.core.results import Candidate


def _log_inliers(c: Candidate | None) -> float:
    return math.log1p(max(c.inliers or 0, 0)) if c is not None else 0.0


def background_level(vector: np.ndarray, background: np.ndarray) -> float:
    """How much a query resembles photos in general: the ``BG_K``-th best cosine of the query descriptor
    ``vector`` to the rows of ``background`` (both L2-normalised and in the space the index scores in, i.e.
    projected when the catalog is adapted). The bundle's background set is fixed, so this does not change with
    what or how much the catalog holds. One [N, D] x [D] product (N ≈ 1000: well under a millisecond)."""
    sims = background @ np.asarray(vector, dtype=np.float32).reshape(-1)
    k = min(BG_K, len(sims))
    return float(np.partition(sims, len(sims) - k)[len(sims) - k])


def decision_features(ranked: Sequence[Candidate], background: float | None = None) -> dict[str, float]:
    """Every feature a DecisionModel may name, from the ranked candidates of one lookup (best first, after
    verification). ``score`` is the top item's cosine (adapted when the index is), ``score_margin`` its lead over
    the best other cosine; ``log_inliers`` is log(1 + inliers) of the top item and ``log_inlier_margin`` its lead
    over the best other verified item (log scale: 8 → 16 inliers means more than 80 → 88). ``score_norm`` is the
    top cosine minus the ``NORM_K``-th best cosine of the lookup (SSCD's score normalisation, the catalog standing
    in for its background set): how far the top item stands out from what this query resembles anyway.
    ``score_bg`` is the top cosine minus ``background`` (the query's :func:`background_level` against the
    bundle's fixed background set: the same normalisation, but independent of the catalog's size and content);
    without a background set it is the top cosine alone."""
    top, rest = ranked[0], list(ranked[1:])
    runner = max(rest, key=lambda c: c.inliers or 0, default=None)
    other_score = max((c.score for c in rest), default=0.0)
    cosines = sorted((c.score for c in ranked), reverse=True)
    kth = cosines[min(NORM_K, len(cosines)) - 1] if len(cosines) > 1 else 0.0
    return {"score": float(top.score), "score_margin": float(top.score - other_score),
            "log_inliers": _log_inliers(top), "log_inlier_margin": _log_inliers(top) - _log_inliers(runner),
            "score_norm": float(top.score - kth),
            "score_bg": float(top.score - (background if background is not None else 0.0))}


def probability(model: DecisionModel, features: dict[str, float]) -> float:
    """P(the top item is the right one) under ``model`` for one lookup's features."""
    x = np.array([features[name] for name in model.features], dtype=np.float64)
    z = float(x @ np.asarray(model.weights, dtype=np.float64) + model.bias)
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def accepts(model: DecisionModel, ranked: Sequence[Candidate], background: float | None = None) -> bool:
    """Whether ``model`` accepts the top item of a verified lookup (``ranked`` not empty; ``background``: the
    query's :func:`background_level`, None without a background set)."""
    return probability(model, decision_features(ranked, background)) >= model.threshold
