"""Reliability figures, measured on a real ``serve`` on 127.0.0.1 (nothing leaves the machine):

  python -m benchmarks reliability [--clients 50] [--seconds 30] [--crash-trials 12] [--store-trials 12] [--fuzz 600]

1. load: N client threads for S seconds (health, latest result, catalog page, upload queries): requests,
   errors (connection errors and 5xx other than the deliberate 503 "busy"), p50 / p99, RSS before / after;
2. memory: peak RSS growth (VmHWM, reset before each request) of the worst uploads that are accepted
   (16 MP PNGs in every mode, a 48 MP JPEG) and of ones refused (a 40 MP greyscale PNG bomb, the ICO whose
   256x256 entry holds a 13300x13300 PNG, a 16 MP JPEG 2000, a WebP claiming 16383x16383);
3. bad inputs: the corpus of tests/test_reliability.py against the real process: N tried, clear 4xx, 5xx;
   then the bombs and N seeded mutations of every format (tests/support/corpus.py) on both upload endpoints: 5xx;
4. crash trials: enrol, ``kill -9`` 0–100 ms after the 202, restart: acknowledged items intact / lost; then
   store trials: random enrolments, re-enrolments and removals, ``kill -9`` 0–200 ms after the last answer,
   restart: acknowledged operations, lost or reverted, resurrected (target 0 and 0);
5. camera loss: an image-folder camera removed and put back: time to notice, time to recover;
6. the systemd unit's exposure (``systemd-analyze security --offline``).
Results: benchmarks/results/reliability.json.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.corpus import bombs, ico_bomb, mutations, valid_files
from tests.support.serve import AUTH, ROOT, Serve, bad_input_corpus

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "var" / "bench" / "reliability"


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0])
    return out


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def load(serve: Serve, queries: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` threads hitting the real server for ``seconds``; every request has a 30 s timeout."""
    latencies: list[float] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop_at:
            roll = rnd.random()
            t0 = time.perf_counter()
            try:
                if roll < 0.2:
                    status, _ = serve.upload("/api/query", rnd.choice(queries))
                else:
                    path = ("/api/health", "/api/results/latest", "/api/catalog?limit=20")[int(roll * 10) % 3]
                    status, _ = serve.request("GET", path)
                key = str(status)
            except OSError as e:
                key = f"error:{type(e).__name__}"
            with lock:
                latencies.append(time.perf_counter() - t0)
                codes[key] = codes.get(key, 0) + 1

    before = _status_kb(serve.proc.pid)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    after = _status_kb(serve.proc.pid)
    errors = sum(n for k, n in codes.items() if k.startswith("error") or (k.startswith("5") and k != "503"))
    q = statistics.quantiles(latencies, n=100)
    return {"clients": clients, "seconds": seconds, "requests": len(latencies), "errors": errors,
            "busy_503": codes.get("503", 0), "codes": codes, "p50_ms": round(q[49] * 1e3, 1),
            "p99_ms": round(q[98] * 1e3, 1), "rss_mb_before": round(before["VmRSS"] / 1024, 1),
            "rss_mb_after": round(after["VmRSS"] / 1024, 1), "anon_mb_before": round(before["RssAnon"] / 1024, 1),
            "anon_mb_after": round(after["RssAnon"] / 1024, 1)}


def memory(serve: Serve, photo: np.ndarray) -> dict:
    """Peak RSS growth of single uploads: VmHWM is reset (clear_refs 5) to the current RSS before each."""
    base = Image.fromarray(photo)
    # blocky upscales compress well: the pixel counts of a worst case inside web.max_upload_mb
    big = base.resize((100, 100)).resize((4000, 4000), Image.Resampling.NEAREST)
    cases = {
        "png_rgb_16mp": _png(big),
        "png_rgba_16mp": _png(big.convert("RGBA")),
        "png_gray16_16mp": _png(Image.fromarray(np.asarray(big.convert("L"), np.uint16) * 257)),
        "png_palette_16mp": _png(big.convert("P")),
        "jpeg_cmyk_16mp": _jpeg(big.convert("CMYK"), quality=70),
        "jpeg_48mp": _jpeg(base.resize((200, 150)).resize((8000, 6000), Image.Resampling.NEAREST), quality=60),
        "png_gray_40mp_bomb": _png(Image.new("L", (6300, 6300), 128)),
        "ico_13300_png_bomb": ico_bomb(full=True),
        "jpeg2000_16mp": bombs()["jpeg2000_16mp"][0],
        "webp_claims_16383": bombs()["webp_claims_16383"][0],
    }
    out = {}
    serve.upload("/api/query", _jpeg(base))  # warm: first-request allocations are not the image's
    for name, data in cases.items():
        Path(f"/proc/{serve.proc.pid}/clear_refs").write_text("5")
        before = _status_kb(serve.proc.pid)
        status, _ = serve.upload("/api/query", data)
        after = _status_kb(serve.proc.pid)
        out[name] = {"upload_kb": len(data) // 1024, "status": status,
                     "peak_growth_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1)}
    accepted = [v["peak_growth_mb"] for v in out.values() if v["status"] == 200]
    return {"cases": out, "worst_accepted_peak_growth_mb": max(accepted, default=None),
            "worst_any_peak_growth_mb": max(v["peak_growth_mb"] for v in out.values())}


def bad_inputs(serve: Serve, corpus: dict) -> dict:
    tried = clear = server_errors = 0
    for name, (data, want, _) in corpus.items():
        for path in ("/api/query", "/api/catalog"):
            fields = {"label": "x", "id": f"bench/{name}"} if path == "/api/catalog" else {}
            status, _ = serve.upload(path, data, **fields)
            tried += 1
            clear += want != 200 and 400 <= status < 500
            server_errors += status >= 500
    alive = serve.request("GET", "/api/health")[0] in (200, 503)
    bad = sum(1 for _, (_, want, _) in corpus.items() if want != 200) * 2
    return {"tried": tried, "bad": bad, "clear_4xx": clear, "5xx": server_errors, "alive_after": alive}


def fuzz(serve: Serve, count: int) -> dict:
    """The bombs and ``count`` seeded mutations of every format on both upload endpoints: statuses, 5xx."""
    corpus = [(n, d) for n, (d, _) in bombs().items()] + list(mutations(valid_files(), count=count, seed=3,
                                                                        budget_s=600))
    codes: dict[str, int] = {}
    for _name, data in corpus:
        for path in ("/api/query", "/api/catalog"):
            status, _ = serve.upload(path, data, **({"label": "fuzz", "id": "fuzz/x"} if path == "/api/catalog" else {}))
            codes[str(status)] = codes.get(str(status), 0) + 1
    alive = serve.request("GET", "/api/health")[0] in (200, 503)
    return {"files": len(corpus), "requests": 2 * len(corpus), "codes": codes,
            "5xx": sum(n for k, n in codes.items() if k.startswith("5") and k != "503"), "alive_after": alive}


def store_trials(serve: Serve, photos: dict, trials: int, seed: int = 0) -> dict:
    """Random enrolments, re-enrolments (a new label each time) and removals of 8 ids, ``kill -9`` 0–200 ms after
    the last answer, restart, and compare what is listed with what was acknowledged (202 / 200)."""
    rnd = random.Random(seed)
    names = ["coffee", "chelsea", "astronaut", "grace_hopper", "camera", "coins", "clock", "page"]
    jpegs = {n: _jpeg(Image.fromarray(photos[n])) for n in names}
    want: dict[str, str | None] = {}  # id → the acknowledged label, None = acknowledged removed
    acknowledged, lost, resurrected = 0, set(), set()
    for trial in range(trials):
        for k in range(rnd.randint(3, 10)):
            item_id = f"store/{rnd.randint(0, 7)}"
            if rnd.random() < 0.75 or want.get(item_id) is None:
                label = f"{item_id} #{trial}.{k}"
                if serve.upload("/api/catalog", jpegs[rnd.choice(names)], label=label, id=item_id)[0] == 202:
                    want[item_id], acknowledged = label, acknowledged + 1
            elif serve.request("DELETE", f"/api/catalog/{item_id}", headers=AUTH)[0] == 200:
                want[item_id], acknowledged = None, acknowledged + 1
        time.sleep(rnd.uniform(0, 0.2))
        serve.kill9()
        serve.start()
        listed = serve.catalog()
        lost |= {i for i, label in want.items() if label is not None and listed.get(i) != label}
        resurrected |= {i for i, label in want.items() if label is None and i in listed}
    return {"trials": trials, "acknowledged": acknowledged, "lost_or_reverted": len(lost),
            "resurrected": len(resurrected), "examples": sorted(lost | resurrected)[:5]}


def crash_trials(serve: Serve, photos: dict, trials: int) -> dict:
    names = ["coffee", "chelsea", "astronaut", "grace_hopper", "camera", "coins", "clock", "page"]
    acknowledged = []
    for i in range(trials):
        item_id = f"crash/{i:02d}"
        status, _ = serve.upload("/api/catalog", _jpeg(Image.fromarray(photos[names[i % len(names)]])),
                                 label=item_id, id=item_id)
        if status == 202:
            acknowledged.append(item_id)
        time.sleep(0.1 * i / max(trials - 1, 1))  # 0 … 100 ms after the acknowledgement
        serve.kill9()
        serve.start()
    _, cat = serve.request("GET", "/api/catalog?limit=1000")
    ids = {it["id"] for it in cat["items"]}
    return {"trials": trials, "acknowledged": len(acknowledged),
            "intact": sum(i in ids for i in acknowledged), "lost": [i for i in acknowledged if i not in ids]}


def camera_loss(folder: Path, photo: np.ndarray, trials: int = 3) -> dict:
    from edge_retrieval.capture.camera import Camera
    from edge_retrieval.core.config import CameraConfig
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(folder / "frame.jpg")
    away = folder.with_name(folder.name + "-unplugged")
    cam = Camera(CameraConfig(source=str(folder), fps=10, stall_timeout_s=2, backoff_initial_s=0.5,
                              backoff_max_s=2)).start()
    notice, recover = [], []
    try:
        for _ in range(trials):
            deadline = time.monotonic() + 30
            while cam.state != "streaming" and time.monotonic() < deadline:
                time.sleep(0.02)
            folder.rename(away)  # the camera is unplugged
            t0 = time.monotonic()
            while cam.state == "streaming" and time.monotonic() < t0 + 30:
                time.sleep(0.02)
            notice.append(time.monotonic() - t0)
            away.rename(folder)  # and plugged back in
            t1 = time.monotonic()
            while cam.state != "streaming" and time.monotonic() < t1 + 60:
                time.sleep(0.02)
            recover.append(time.monotonic() - t1)
    finally:
        cam.stop()
    return {"trials": trials, "notice_s": [round(x, 2) for x in notice], "recover_s": [round(x, 2) for x in recover]}


def exposure() -> dict:
    unit = ROOT / "systemd" / "edge-retrieval.service"
    if shutil.which("systemd-analyze") is None:
        return {"skipped": "systemd-analyze is not installed"}
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                         text=True, timeout=60)
    last = [line for line in out.stdout.splitlines() if "Overall exposure level" in line]
    return {"line": last[0].strip() if last else out.stderr.strip()[:200]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks reliability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--crash-trials", type=int, default=12)
    ap.add_argument("--store-trials", type=int, default=12)
    ap.add_argument("--fuzz", type=int, default=600, help="mutated files sent to each upload endpoint")
    args = ap.parse_args(argv)
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import shipped_photos
    from edge_retrieval.imaging.synthetic_views import camera_view
    photos = shipped_photos()
    shutil.rmtree(WORK, ignore_errors=True)
    catalog = WORK / "catalog"
    catalog.mkdir(parents=True)
    for name in ("rocket", "moon", "brick", "chelsea"):
        (catalog / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 92))
    rng = np.random.default_rng(0)
    queries = [encode_jpeg(camera_view(photos[n], k, rng), 85) for n in ("rocket", "moon", "coffee")
               for k in ("closeup", "table")]
    report: dict = {"bench": "reliability", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    serve = Serve(WORK, catalog)
    try:
        serve.start()
        print("load …", flush=True)
        report["load"] = load(serve, queries, args.clients, args.seconds)
        print(json.dumps(report["load"]), flush=True)
        report["memory"] = memory(serve, photos["astronaut"])
        print(json.dumps(report["memory"]), flush=True)
        report["bad_inputs"] = bad_inputs(serve, bad_input_corpus(photos))
        print(json.dumps(report["bad_inputs"]), flush=True)
        report["fuzz"] = fuzz(serve, args.fuzz)
        print(json.dumps(report["fuzz"]), flush=True)
        report["crash"] = crash_trials(serve, photos, args.crash_trials)
        print(json.dumps(report["crash"]), flush=True)
        report["store"] = store_trials(serve, photos, args.store_trials)
        print(json.dumps(report["store"]), flush=True)
    finally:
        serve.stop()
    report["camera_loss"] = camera_loss(WORK / "camera", photos["rocket"])
    print(json.dumps(report["camera_loss"]), flush=True)
    report["systemd"] = exposure()
    print(json.dumps(report["systemd"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0
