"""Does the decision's score mean the same whatever the catalog's size? (``python -m benchmarks catalog_size``)

The camera-view benchmark's queries (the same views, the same open set) against three catalogs made from the same
photos: the queried items alone (66), the benchmark's catalog (66 + 220 distractors) and the same with 1000 more
distractors (crops of the same photos, as hard as the 220). The learned decision of each feature set
(benchmarks/recognition.py FEATURE_SETS) is fitted on one source half of the benchmark catalog's answers and rated
on the other half at each catalog size (both ways round, averaged): a score whose meaning holds gives about the
same correct / wrong / false accepts at every size, one that compares the top item with the rest of the catalog
(margins, score_norm) drifts. The model fitted on all views is rated at each size too.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.views import CACHE, RESULTS, CropPlan, camera_view_set, write_json
from edge_retrieval.core.config import DEFAULT_BUNDLE

SIZES = {"queried_only": 0, "benchmark": CropPlan().distractors, "plus_1000": CropPlan().distractors + 1000}
MODE = "adapted_verified"


def _answers(name: str, distractors: int, bundle: Path, reuse: bool) -> tuple[dict, list, list, Path]:
    from benchmarks.recognition import open_set, run_mode, work_dir
    root = CACHE / "camera_views" if name == "benchmark" else CACHE / f"camera_views_{name}"
    data = camera_view_set(root, plan=CropPlan(distractors=distractors))
    openq = open_set(CACHE / "open_set")
    inq = [(str(data.root / q["path"]), q) for q in data.queries]
    work = work_dir(MODE, bundle) if name == "benchmark" else work_dir(f"{MODE}_{name}", bundle)
    if reuse and (work / "answers.json").is_file():
        ans = json.loads((work / "answers.json").read_text())
    else:
        print(f"  {name}: {data.n_items} catalog items, building and querying ({len(inq) + len(openq)} views)", flush=True)
        ans = run_mode(MODE, data.catalog, [p for p, _ in inq] + [q["path"] for q in openq], bundle, work)["answers"]
    return ans, inq, openq, work


def main(argv: list[str] | None = None) -> int:
    """Query the three catalogs (or reuse their answers) and rate each feature set's decision at each size."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks catalog_size", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--reuse", action="store_true", help="reuse each catalog's answers of the last run")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args(argv)
    from benchmarks.decision import _model, _subset, halves, predict, rates, with_background
    from benchmarks.recognition import FEATURE_SETS, decision_table
    from edge_retrieval.convert.images import TRAINING_PACKAGES, training_pool_files
    if not training_pool_files():
        print(f"skipped: the open set's photos are missing (apt-get install {' '.join(TRAINING_PACKAGES)})")
        return 0
    from benchmarks.recognition import rates as threshold_rates
    from edge_retrieval.model.bundle import load_manifest
    cal = load_manifest(args.bundle, verify_sha=False).calibration
    tables, at_thresholds = {}, {}
    for name in dict.fromkeys(["benchmark", *args.sizes]):
        ans, inq, openq, work = _answers(name, SIZES[name], args.bundle, args.reuse)
        tables[name] = decision_table(ans, inq, openq, args.bundle, work)
        at_thresholds[name] = threshold_rates([(ans[p], q["item"]) for p, q in inq], [ans[q["path"]] for q in openq],
                                              cal.accept_inliers, cal.accept_score)
        recall = float(np.mean([bool(ans[p]["results"]) and ans[p]["results"][0]["id"] == q["item"] for p, q in inq]))
        print(f"  {name}: recall@1 (all views) {recall:.4f}; the bundle's two thresholds ({cal.accept_inliers} "
              f"inliers / cosine {cal.accept_score}): {at_thresholds[name]}", flush=True)
    fit = tables["benchmark"]
    src = halves(fit["groups"])
    report: dict = {"mode": MODE, "bundle": args.bundle.name, "sizes": {k: SIZES[k] + 66 for k in args.sizes},
                    "at_thresholds": {k: at_thresholds[k] for k in args.sizes}, "feature_sets": {}}
    for fs, features in FEATURE_SETS.items():
        rows = {}
        full = _model(fit, features, "")
        for name in args.sizes:
            folds = []
            for train, test in ((src, ~src), (~src, src)):
                allowed = set(fit["groups"][train].tolist())
                m = _model(_subset(with_background(fit, allowed), train), features, "")
                rated = _subset(with_background(tables[name], allowed), test)
                folds.append(rates(predict(m, rated), rated, m.threshold))
            held = {k: round(float(np.mean([f[k] for f in folds])), 4) for k in folds[0] if k != "threshold"}
            rows[name] = {"held_out": held, "fitted_on_all": rates(predict(full, tables[name]), tables[name], full.threshold)}
            print(f"[{fs}] {name:>12} ({report['sizes'][name]} items): held out {held}; fitted on all "
                  f"{rows[name]['fitted_on_all']}", flush=True)
        report["feature_sets"][fs] = {"features": list(features), "by_size": rows}
    write_json(RESULTS / "decision_catalog_size.json", report)
    print(f"wrote {RESULTS / 'decision_catalog_size.json'}")
    return 0
