"""What simulated tilts (``recognition.enrol_tilts``) cost per catalog photo: ``python -m benchmarks tilt_cost``.

For each setting (none, ``[2.5]``, ``[1.6, 2.5]``, three directions, 150 keypoints a tilted view), on six photos
that ship in scikit-image: the stored keypoints and bytes (40 a keypoint: float32 xy + 32-byte descriptor,
edge_retrieval/index/feature_store.py), the catalog-side ORB time of one photo, and one verification (query 1000
keypoints of a table view of the photo against it: the right photo, and the five others), single-threaded OpenCV,
the settings interleaved in each round, medians. Writes benchmarks/results/tilt_cost.json.
"""
from __future__ import annotations

import statistics
import time

import cv2
import numpy as np

from benchmarks.views import RESULTS, write_json
from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.imaging.synthetic_views import camera_view
from edge_retrieval.model import local_features as lf

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
SETTINGS = {"none": [], "[2.5]": [2.5], "[1.6, 2.5]": [1.6, 2.5]}
ROUNDS = 5


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main(argv: list[str] | None = None) -> int:
    """Time every setting, interleaved; print and write the medians."""
    from skimage import data
    cv2.setNumThreads(1)
    photos = {}
    for n in NAMES:
        img = getattr(data, n)()
        photos[n] = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else np.ascontiguousarray(img[..., :3])
    base = RecognitionConfig()
    cfgs = {k: base.model_copy(update={"enrol_tilts": v}) for k, v in SETTINGS.items()}
    rng = np.random.default_rng(0)
    queries = {n: lf.extract(camera_view(photos[n], "table", rng), base, query=True) for n in NAMES}
    cats = {k: {n: lf.extract(photos[n], c) for n in NAMES} for k, c in cfgs.items()}
    times: dict[str, dict[str, list[float]]] = {k: {"enrol": [], "right": [], "wrong": []} for k in cfgs}
    for _ in range(ROUNDS):
        for k, c in cfgs.items():
            for n in NAMES:
                times[k]["enrol"].append(_ms(lambda n=n, c=c: lf.extract(photos[n], c)))
                times[k]["right"].append(_ms(lambda n=n, c=c, k=k: lf.verify(queries[n], cats[k][n], c,
                                                                             accept_inliers=8)))
                for m in NAMES:
                    if m != n:
                        times[k]["wrong"].append(_ms(lambda n=n, m=m, c=c, k=k: lf.verify(
                            queries[n], cats[k][m], c, accept_inliers=8)))
    report = {"rounds": ROUNDS, "photos": list(NAMES), "settings": {}}
    for k in cfgs:
        kp = statistics.mean(len(f) for f in cats[k].values())
        row = {"keypoints": round(kp), "bytes": round(kp * (8 + lf.DESC_BYTES)),
               "enrol_orb_ms": round(statistics.median(times[k]["enrol"]), 2),
               "verify_right_ms": round(statistics.median(times[k]["right"]), 2),
               "verify_wrong_ms": round(statistics.median(times[k]["wrong"]), 2)}
        report["settings"][k] = row
        print(f"enrol_tilts {k:11s} {row}", flush=True)
    none = report["settings"]["none"]
    for k, row in report["settings"].items():
        print(f"enrol_tilts {k:11s} ÷ none: keypoints {row['keypoints'] / none['keypoints']:.2f}, enrol ORB "
              f"{row['enrol_orb_ms'] / none['enrol_orb_ms']:.2f}, verify wrong {row['verify_wrong_ms'] / none['verify_wrong_ms']:.2f}")
    write_json(RESULTS / "tilt_cost.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
