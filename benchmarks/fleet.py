"""MQTT events at fleet scale, against a real Mosquitto on 127.0.0.1 (started here on a free port).

    python -m benchmarks fleet        (or: python -m benchmarks.fleet [--pairs 150] [--burst 5000] [--devices 20])

1. One device: lookup time (camera path, RGB frame → lookup, the default bundle, a catalog of the shipped
   photos, global search: the fastest lookup, so the worst case for the publisher's share) with and without
   ``MqttPublisher.publish_lookup`` after each lookup, as ``Appliance`` does — interleaved pairs, medians.
2. One device's publisher flat out: ``publish_lookup`` called back to back (each = the event + the retained
   match state, QoS 1): the cost of one call, and events/s delivered to a subscriber until all arrived.
3. A fleet: N devices (threads, each its own ``MqttPublisher`` and client id) publishing to one broker;
   events/s the one subscriber receives.

Writes benchmarks/results/fleet.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from edge_retrieval.core.config import MqttConfig
from edge_retrieval.outputs.mqtt import MqttPublisher
from tests.support.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CATALOG = ("astronaut", "chelsea", "rocket", "coins", "camera", "china", "flower", "brick", "moon", "clock")


class Counter:
    """A subscriber counting lookup events on ``topic`` (a wildcard is fine)."""

    def __init__(self, port: int, topic: str):
        self.n = 0
        self.first_at = self.last_at = 0.0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{time.monotonic_ns()}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        _wait(lambda: self.client.is_connected(), 5)
        time.sleep(0.2)

    def _on_message(self, *_):
        with self._lock:
            now = time.perf_counter()
            self.first_at = self.first_at or now
            self.n += 1
            self.last_at = now

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _publisher(port: int, device_id: str, queue_size: int = 1000) -> MqttPublisher:
    pub = MqttPublisher(MqttConfig(enabled=True, host="127.0.0.1", port=port, device_id=device_id,
                                   client_id=f"bench-{device_id}", topic_prefix="fleet", queue_size=queue_size)).start()
    if not _wait(lambda: pub.stats()["connected"], 10):
        raise RuntimeError(f"publisher {device_id} did not connect: {pub.stats()}")
    return pub


def lookup_overhead(port: int, work: Path, pairs: int) -> dict:
    """Interleaved lookups with and without publish_lookup after each."""
    from edge_retrieval.app import wiring
    from edge_retrieval.core.config import BuildConfig, Config, IndexConfig, RecognitionConfig
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import shipped_photos
    from edge_retrieval.imaging.synthetic_views import camera_view
    photos = shipped_photos()
    cat = work / "catalog"
    cat.mkdir()
    for name in CATALOG:
        (cat / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 90))
    rng = np.random.default_rng(0)
    frames = [camera_view(photos[CATALOG[i % len(CATALOG)]], "perspective", rng) for i in range(12)]
    pub = _publisher(port, "solo")
    sub = Counter(port, "fleet/solo/lookup")
    cfg = Config(recognition=RecognitionConfig(enrol_views=[], features=False, verify=False),  # the fastest lookup
                 index=IndexConfig(path=work / "index"), build=BuildConfig(workers=1))
    with wiring.load(cfg) as enc:
        wiring.build_catalog(cfg, enc, cat)
        lookup = wiring.build_lookup(cfg, enc, wiring.open_index(cfg, enc))
        for f in frames[:4]:
            lookup.lookup_rgb(f, source="camera")  # warm-up
        bare, attached, calls = [], [], []
        for i in range(2 * pairs):  # the same frame twice in a row, with and without, in alternating order
            frame = frames[(i // 2) % len(frames)]
            with_publisher = (i % 2 == 0) == ((i // 2) % 2 == 0)
            t0 = time.perf_counter()
            result = lookup.lookup_rgb(frame, source="camera")
            t1 = time.perf_counter()
            if with_publisher:
                pub.publish_lookup(result)
                t2 = time.perf_counter()
                attached.append(t2 - t0)
                calls.append(t2 - t1)
            else:
                bare.append(t1 - t0)
        lookup.index.close()
    _wait(lambda: sub.n >= pairs, 10)
    out = {"pairs": pairs, "lookup_ms_median": round(statistics.median(bare) * 1e3, 3),
           "lookup_plus_publish_ms_median": round(statistics.median(attached) * 1e3, 3),
           "ratio": round(statistics.median(attached) / statistics.median(bare), 3),
           "publish_lookup_call_us_median": round(statistics.median(calls) * 1e6, 1),
           "events_received": sub.n, "dropped": pub.stats()["dropped"]}
    sub.close()
    pub.stop()
    return out


def burst(port: int, n: int) -> dict:
    """publish_lookup back to back: call cost, and delivered events/s until the subscriber has them all."""
    from edge_retrieval.core.results import Candidate, LookupResult
    top = Candidate("rocket", "rocket", 0.91, 37)
    result = LookupResult([top], {"encode": 3.4, "search": 0.7, "total": 4.6}, "camera", match=top)
    pub = _publisher(port, "burst", queue_size=2 * n + 10)
    sub = Counter(port, "fleet/burst/lookup")
    t0 = time.perf_counter()
    for _ in range(n):
        pub.publish_lookup(result)
    t1 = time.perf_counter()
    complete = _wait(lambda: sub.n >= n, 120)
    out = {"events": n, "call_us_mean": round((t1 - t0) / n * 1e6, 1),
           "offered_events_per_s": round(n / (t1 - t0)),
           "delivered_events_per_s": round(sub.n / (sub.last_at - t0)) if sub.n else 0,
           "messages_per_event": 2, "received": sub.n, "complete": complete, "dropped": pub.stats()["dropped"]}
    sub.close()
    pub.stop()
    return out


def fleet(port: int, devices: int, per_device: int) -> dict:
    """N publishers (threads) at once; events/s at the one subscriber."""
    from edge_retrieval.core.results import Candidate, LookupResult
    top = Candidate("rocket", "rocket", 0.91, 37)
    result = LookupResult([top], {"total": 4.6}, "camera", match=top)
    sub = Counter(port, "fleet/+/lookup")
    pubs = [_publisher(port, f"dev{i:03d}", queue_size=2 * per_device + 10) for i in range(devices)]
    threads = [threading.Thread(target=lambda p=p: [p.publish_lookup(result) for _ in range(per_device)])
               for p in pubs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    complete = _wait(lambda: sub.n >= devices * per_device, 120)
    out = {"devices": devices, "events_per_device": per_device, "received": sub.n, "complete": complete,
           "delivered_events_per_s": round(sub.n / (sub.last_at - t0)) if sub.n else 0,
           "dropped": sum(p.stats()["dropped"] for p in pubs)}
    sub.close()
    for p in pubs:
        p.stop()
    return out


def main(argv: list[str]) -> int:
    """Run the three measures and write benchmarks/results/fleet.json."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet")
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--burst", type=int, default=5000)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-device", type=int, default=250)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        report = {"lookup_with_publisher": lookup_overhead(broker.port, Path(tmp), args.pairs)}
        print(json.dumps(report["lookup_with_publisher"]), flush=True)
        report["one_publisher_flat_out"] = burst(broker.port, args.burst)
        print(json.dumps(report["one_publisher_flat_out"]), flush=True)
        report["fleet_one_broker"] = fleet(broker.port, args.devices, args.per_device)
        print(json.dumps(report["fleet_one_broker"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
