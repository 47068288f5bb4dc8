"""What the operations features cost (``python -m benchmarks ops``, benchmarks/results/ops.json):

- recording one lookup in the persistent history (edge_retrieval/outputs/history.py: SQLite WAL, synchronous=FULL, one
  transaction with its 320 px snapshot and the pruning), on this machine's disk, median and p95, and of that
  the snapshot's JPEG encoding alone (which the in-memory history of earlier versions paid too);
- the store's file size against ``history.max_mb`` after many more lookups than fit;
- one ``PushHub.publish`` to 0, 1 and 8 open streams, one of them never read (edge_retrieval/outputs/push.py)."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_retrieval.core.config import HistoryConfig, SseConfig
from edge_retrieval.core.results import Candidate, LookupResult
from edge_retrieval.imaging.codec import make_thumbnail
from edge_retrieval.imaging.shipped_photos import shipped_photos
from edge_retrieval.imaging.synthetic_views import camera_view
from edge_retrieval.outputs.history import STORE_NAME, History
from edge_retrieval.outputs.push import PushHub

ROOT = Path(__file__).resolve().parent.parent


def _result(i: int) -> LookupResult:
    cands = [Candidate(f"item/{i % 50}-{k}", f"Item {k}", 0.9 - k / 20, 30 - k, 1.2 - k / 20) for k in range(5)]
    return LookupResult(cands, {"decode": 3.0, "encode": 4.1, "search": 0.3, "verify": 6.2, "total": 13.6},
                        "camera", match=cands[0])


def _ms(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1e3, 3),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1e3, 3), "n": len(ordered)}


def bench_history(folder: Path, records: int) -> dict:
    photos = list(shipped_photos().values())
    rng = np.random.default_rng(0)
    frames = [camera_view(photos[i % len(photos)], "table", rng) for i in range(20)]
    history = History(HistoryConfig(size=10_000, max_mb=2.0, dir=folder / "h"))
    took = []
    for i in range(records):
        t0 = time.perf_counter()
        history.record(_result(i), frames[i % len(frames)])
        took.append(time.perf_counter() - t0)
    snapshot = []  # of which: encoding the 320 px snapshot alone
    for i in range(min(records, 200)):
        t0 = time.perf_counter()
        make_thumbnail(frames[i % len(frames)], history.config.snapshot_px)
        snapshot.append(time.perf_counter() - t0)
    kept = len(history.entries())
    stored = history.stored_bytes()
    history.close()
    file_mb = (folder / "h" / STORE_NAME).stat().st_size / 2**20
    return {"record": _ms(took), "snapshot_encode_only": _ms(snapshot),
            "frame": list(frames[0].shape), "records": records, "kept": kept, "max_mb": 2.0,
            "stored_mb": round(stored / 2**20, 3), "file_mb_after_close": round(file_mb, 3)}


def bench_push(n_events: int) -> dict:
    out = {}
    for n_streams in (0, 1, 8):
        hub = PushHub(SseConfig(queue_size=100))
        streams = [hub.open() for _ in range(n_streams)]  # streams[0] is never read
        took = []
        for i in range(n_events):
            t0 = time.perf_counter()
            hub.publish("lookup_started", {"source": "camera", "i": i})
            took.append(time.perf_counter() - t0)
            for s in streams[1:]:
                s.next(0)
        out[f"{n_streams}_streams"] = {**_ms(took), "slow_clients_disconnected": hub.slow_clients}
        hub.close()
    return out


def main(argv: list[str]) -> int:
    """Run both benches and write benchmarks/results/ops.json."""
    p = argparse.ArgumentParser(prog="python -m benchmarks ops")
    p.add_argument("--records", type=int, default=500)
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ops.json")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-ops-", dir=ROOT / "var" if (ROOT / "var").is_dir() else None))
    try:
        results = {"history": bench_history(folder, args.records), "push": bench_push(args.events)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0
