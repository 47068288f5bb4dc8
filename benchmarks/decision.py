"""Fit the learned match / no-match decision (edge_retrieval/search/decision.py) on the answers of a verified calibrate mode.

Positives: in-catalog views whose top item is right; negatives: in-catalog views whose top item is wrong (an
accept would be a wrong accept) and every open-set view. The features are computed by the device's own
``decision_features`` from the candidates the CLI returned, so the bench decides exactly as the device would.

Overfitting guard, two ways, each both ways round (fit + threshold on one half, rates on the other):
- by image source: the catalog's source photos in two halves (every crop of a photo on one side), the open set's
  wallpapers by Debian package (gnome-backgrounds on one side, ukui-wallpapers on the other), empty tables halved;
- by image source *and* view kind: the same, and the view kinds split in two (KIND_HALVES), so the rated half
  has neither the photos nor the kinds of view the fit saw.
The shipped coefficients are then fitted on everything with the threshold chosen the same way.
"""
from __future__ import annotations

import math

import numpy as np

from edge_retrieval.core.config import DECISION_FEATURES, DecisionModel
from edge_retrieval.core.results import Candidate
from edge_retrieval.search.decision import decision_features, probability

MAX_FALSE_ACCEPT = 0.01  # issue 27: <= 1 % false accepts (unknown photos and empty tables)
MAX_WRONG_ACCEPT = 0.01


def candidates(ans: dict) -> list[Candidate]:
    """The CLI's JSON results of one query back as the device's Candidates."""
    return [Candidate(r["id"], r.get("label", r["id"]), float(r["score"]), r.get("inliers")) for r in ans["results"]]


# The view kinds in two halves for the held-out-kind rating (open-set kinds by the same names; empty tables have
# no kind and follow their source half).
KIND_HALVES = ({"closeup", "perspective", "zoom", "color_cast", "noise_jpeg", "table", "steep"},
               {"rotate", "lighting", "blur", "occluded", "table_occluded", "box", "partial"})


def table(inside: list[tuple[dict, str, str, str]], outside: list[tuple[dict, str, str]],
          background: dict | None = None) -> dict:
    """Feature matrix and labels: ``inside`` = (answer, true item, source group, view kind), ``outside`` =
    (answer, source group, view kind). A source group is 'kind:name' (photo:…, package:…, table:…): the held-out
    split halves each kind of group on its own, so both packages never land on one side.

    ``background`` (optional): {"sims": [rows, N] cosines of each row's query to the background set (in the
    index's space), "groups": [N] the coarse source group of each background vector, "sources": [N] its photo,
    "row_sources": [rows] each row's photo}. ``score_bg`` is then computed per fit (:func:`with_background`):
    never against background views of the row's own photo, and in a held-out fold only against the background
    views of the fitted half's photos, as a user's catalog and unknown photos are never in the shipped set."""
    rows, correct, is_in, groups, kinds = [], [], [], [], []
    for ans, truth, group, kind in inside:
        cands = candidates(ans)
        rows.append(decision_features(cands) if cands else None)
        correct.append(bool(cands) and cands[0].id == truth)
        is_in.append(True)
        groups.append(group)
        kinds.append(kind)
    for ans, group, kind in outside:
        cands = candidates(ans)
        rows.append(decision_features(cands) if cands else None)
        correct.append(False)
        is_in.append(False)
        groups.append(group)
        kinds.append(kind.removeprefix("open:"))
    empty = dict.fromkeys(DECISION_FEATURES, 0.0)
    x = np.array([[(r or empty)[f] for f in DECISION_FEATURES] for r in rows], np.float64)
    t = {"x": x, "y": np.array(correct), "inside": np.array(is_in), "groups": np.array(groups),
         "kinds": np.array(kinds), "has": np.array([r is not None for r in rows])}
    if background is not None:
        t.update(bg_sims=np.asarray(background["sims"], np.float32), row_sources=np.array(background["row_sources"]))
        t["bg_groups"], t["bg_sources"] = np.array(background["groups"]), np.array(background["sources"])
    return with_background(t, None)


def with_background(t: dict, allowed_groups: set[str] | None) -> dict:
    """``t`` with its ``score_bg`` column = score − the row's background level over the background vectors of
    ``allowed_groups`` (None: all), leaving out those of the row's own photo; unchanged without background."""
    if "bg_sims" not in t:
        return t
    from edge_retrieval.core.config import BG_K
    ok = np.ones(len(t["bg_groups"]), bool) if allowed_groups is None else np.isin(t["bg_groups"], sorted(allowed_groups))
    sims = np.where(ok[None, :] & (t["bg_sources"][None, :] != t["row_sources"][:, None]), t["bg_sims"], -np.inf)
    level = -np.sort(-sims, axis=1)[:, BG_K - 1]
    x = t["x"].copy()
    col, score = DECISION_FEATURES.index("score_bg"), DECISION_FEATURES.index("score")
    x[:, col] = np.where(t["has"], x[:, score] - level, 0.0)
    return {**t, "x": x}


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method on standardised features; (weights, bias) for the
    raw features (the scaling folded in, so the device needs no scaler)."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2 * len(x))
    reg[-1] = 0.0  # the bias is not shrunk
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = w[:-1] / sd
    return weights, float(w[-1] - weights @ mu)


def rates(p: np.ndarray, t: dict, threshold: float) -> dict:
    """Decision rates when accepting at probability ≥ ``threshold``."""
    acc = (p >= threshold) & t["has"]
    n_in, n_out = int(t["inside"].sum()), int((~t["inside"]).sum())
    return {"threshold": round(float(threshold), 4),
            "correct_accept": round(float((acc & t["y"]).sum() / n_in), 4),
            "wrong_accept": round(float((acc & t["inside"] & ~t["y"]).sum() / n_in), 4),
            "open_set_false_accept": round(float((acc & ~t["inside"]).sum() / n_out), 4)}


def choose_threshold(p: np.ndarray, t: dict) -> float:
    """The lowest probability threshold (most correct accepts) within the false / wrong accept limits."""
    for th in np.unique(np.concatenate([p, [1.0]])):
        r = rates(p, t, th)
        if r["open_set_false_accept"] <= MAX_FALSE_ACCEPT and r["wrong_accept"] <= MAX_WRONG_ACCEPT:
            return float(th)
    return 1.0


def _subset(t: dict, mask: np.ndarray) -> dict:
    return {k: (v[mask] if not k.startswith("bg_") else v) for k, v in t.items()}


def _model(t: dict, features: tuple[str, ...], fitted_on: str) -> DecisionModel:
    cols = [DECISION_FEATURES.index(f) for f in features]
    w, b = fit_logistic(t["x"][:, cols], t["y"].astype(np.float64))
    provisional = DecisionModel(features=list(features), weights=w.tolist(), bias=b, threshold=0.5)
    p = predict(provisional, t)
    # Floored to 4 decimals so the view the threshold was chosen at is still accepted with the rounded value.
    return provisional.model_copy(update={"threshold": math.floor(choose_threshold(p, t) * 1e4) / 1e4,
                                          "weights": [round(float(v), 5) for v in w], "bias": round(b, 5),
                                          "fitted_on": fitted_on})


def predict(model: DecisionModel, t: dict) -> np.ndarray:
    """P(right) per row of ``t`` under ``model``."""
    return np.array([probability(model, dict(zip(DECISION_FEATURES, row))) for row in t["x"]])


def halves(groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """A boolean mask putting each source group wholly in one half, each kind of group (photo:, package:,
    table:) halved on its own."""
    first: set[str] = set()
    names = sorted(set(groups.tolist()))
    for prefix in sorted({n.split(":", 1)[0] for n in names}):
        mine = [n for n in names if n.split(":", 1)[0] == prefix]
        order = np.random.default_rng(seed).permutation(len(mine))
        first |= {mine[i] for i in order[: max(1, len(mine) // 2)]} if len(mine) > 1 else set()
    return np.array([g in first for g in groups.tolist()])


def kind_half(t: dict, source_half: np.ndarray) -> np.ndarray:
    """True where a row's view kind is in KIND_HALVES[0]; rows without a kind (empty tables) follow their source half."""
    known = np.isin(t["kinds"], sorted(KIND_HALVES[0] | KIND_HALVES[1]))
    return np.where(known, np.isin(t["kinds"], sorted(KIND_HALVES[0])), source_half)


def _two_folds(t: dict, train_masks: list[tuple[np.ndarray, np.ndarray]], features: tuple[str, ...]):
    """Fit + threshold on each train mask, rate on its test mask; (per-fold rates, their mean, test probabilities)."""
    folds, curve_p = [], np.full(len(t["y"]), np.nan)
    for train, test in train_masks:
        t = with_background(t, set(t["groups"][train].tolist()))  # the fitted half's photos only
        m = _model(_subset(t, train), features, "")
        p_test = predict(m, _subset(t, test))
        curve_p[test] = p_test
        folds.append(rates(p_test, _subset(t, test), m.threshold))
    mean = {k: round(float(np.mean([f[k] for f in folds])), 4) for k in folds[0] if k != "threshold"}
    return folds, mean, curve_p


def fit_and_evaluate(t: dict, features: tuple[str, ...] = DECISION_FEATURES, fitted_on: str = "") -> dict:
    """Held-out rates by source (2 folds) and by source and view kind (2 folds), the held-out operating curve,
    and the model fitted on everything (what the bundle's calibration ships)."""
    src = halves(t["groups"])
    kind = kind_half(t, src)
    folds, held_out, curve_p = _two_folds(t, [(src, ~src), (~src, src)], features)
    folds_sk, held_out_sk, _ = _two_folds(t, [(src & kind, ~src & ~kind), (~src & ~kind, src & kind)], features)
    curve = [rates(curve_p, t, th) for th in np.linspace(0, 1, 101)]
    full = _model(t, features, fitted_on)
    return {"features": list(features), "held_out_folds": folds, "held_out_mean": held_out,
            "held_out_source_and_kind_folds": folds_sk, "held_out_source_and_kind": held_out_sk,
            "held_out_curve": curve, "model": full.model_dump(),
            "in_sample": rates(predict(full, t), t, full.threshold)}
