"""Changes without rewriting the catalog (edge_retrieval/index/delta.py): ``python -m benchmarks incremental``.

For each catalog size (``--sizes``, default 1000 100000) a base generation of synthetic items — real descriptors
of camera views of the shipped photos, perturbed (as benchmarks/scale.py), 3 vectors an item, the catalog-adapted
projection of the defaults — is written stamped with a fresh catalog store, and:

1. a real ``serve`` (tests/support/serve.py, default bundle, defaults but ``index.merge_after_items`` out of reach)
   gets ``--enrolments`` enrolments over HTTP, each of a real photo: the time from sending it to the first lookup
   of a camera view of it that matches it (enrolment → searchable), the same for removals, and the bytes the server
   wrote per enrolment (``/proc/<pid>/io`` write_bytes, and wchar: what it handed to write());
2. in this process: the live index with a delta of 0, 1,000 and 10,000 items — the index query alone and a whole
   lookup of real camera views (encode + query), alternating, medians and ratios to the empty delta — and the
   anonymous memory the delta adds per 1,000 items.

Results: ``benchmarks/results/incremental.json``; docs/scale.md ("Changes without rewriting the catalog").
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "bench" / "incremental"
RESULTS = ROOT / "benchmarks" / "results" / "incremental.json"
PHOTOS = ("coffee", "chelsea", "astronaut", "grace_hopper", "camera", "coins", "clock", "page", "china", "flower",
          "rocket", "moon", "brick", "hubble_deep_field", "immunohistochemistry", "motorcycle_left")


def log(msg: str) -> None:
    print(msg, flush=True)


def _io(pid: int | str) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


class Synthetic:
    """Perturbed real descriptors (benchmarks/scale.py's recipe) and the catalog-adapted projection fitted on them."""

    def __init__(self, enc, rc):
        from benchmarks.annoy_recall import perturbation_sigma
        from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
        from edge_retrieval.model.adaptation import Projection, adaptation_views, fit_lw
        cache = WORK / f"real-{enc.sha256[:12]}.npz"
        if cache.is_file():
            z = dict(np.load(cache))
        else:
            crops = photo_crops(shipped_photos(), 8, seed=5)
            base, views = [], []
            for g, (_name, img) in enumerate(sorted(crops.items())):
                base.append(enc.embed(img))
                views.append(np.stack([enc.embed(v) for v in adaptation_views(img, 4, seed=g)]))
            z = {"base": np.stack(base), "views": np.stack(views)}
            WORK.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **z)
        base, views = z["base"], z["views"]
        mean, matrix = fit_lw(base, views, rc.adapt_dim, rc.adapt_shrinkage)
        self.projection = Projection(mean, matrix, len(base), views.shape[1], enc.sha256)
        self.pool = np.concatenate([base, views.reshape(-1, base.shape[1])])
        group = np.concatenate([np.arange(len(base)), np.repeat(np.arange(len(base)), views.shape[1])])
        self.sigma = perturbation_sigma(self.pool, group)
        self.per = 1 + len(rc.enrol_views)
        self.rng = np.random.default_rng(0)

    def items(self, n: int, prefix: str):
        from edge_retrieval.index.reader import CatalogItem
        for i in range(n):
            src = self.pool[self.rng.integers(len(self.pool))]
            v = src + self.rng.normal(0, self.sigma, (self.per, src.size)).astype(np.float32) * np.array(
                [[1.0]] + [[0.5]] * (self.per - 1), np.float32)
            yield CatalogItem(f"{prefix}/{i:07d}", f"Item {i}", v / np.linalg.norm(v, axis=1, keepdims=True))


def write_base(state: Path, n: int, syn: Synthetic, enc, n_trees: int) -> float:
    """A base generation of ``n`` synthetic items in ``state/index``, stamped with a new store at ``state``."""
    from edge_retrieval.catalog.store import CatalogStore
    from edge_retrieval.index.writer import write_index
    store = CatalogStore(state / "catalog.sqlite")
    mark = (store.id, store.seq())
    store.close()
    t0 = time.perf_counter()
    write_index(state / "index", syn.items(n, "item"), bundle_sha256=enc.sha256, n_trees=n_trees, dim=enc.dim,
                projection=syn.projection, store=mark)
    return time.perf_counter() - t0


def bench_serve(state: Path, n_enrol: int) -> dict:
    """Enrolment → searchable, removal → gone, bytes written per enrolment, in a real serve."""
    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import shipped_photos
    from edge_retrieval.imaging.synthetic_views import camera_view
    from tests.support.serve import AUTH, Serve
    photos = shipped_photos()
    names = [p for p in PHOTOS if p in photos][:n_enrol]
    cat_dir = state / "unused-catalog"
    cat_dir.mkdir(exist_ok=True)
    (cat_dir / "x.jpg").write_bytes(encode_jpeg(photos[names[0]]))
    serve = Serve(state, cat_dir, build_from=False, index_extra="  merge_after_items: 10000000\n")
    views = {n: encode_jpeg(camera_view(photos[n], "closeup", np.random.default_rng(3))) for n in names}

    def top(name: str) -> str | None:
        status, res = serve.upload("/api/query", views[name])
        assert status == 200, res
        return res["match"]["id"] if res.get("match") else (res["results"][0]["id"] if res["results"] else None)

    out: dict = {"enrol_s": [], "remove_s": []}
    try:
        t0 = time.perf_counter()
        serve.start(timeout_s=600)
        out["start_s"] = round(time.perf_counter() - t0, 1)
        top(names[0])  # warm
        io0 = _io(serve.proc.pid)
        for k, name in enumerate(names):
            item_id = f"new/{k}"
            t = time.perf_counter()
            assert serve.upload("/api/catalog", encode_jpeg(photos[name], 90), label=name, id=item_id)[0] == 202
            while top(name) != item_id:
                assert time.perf_counter() - t < 120, f"{item_id} not searchable after 120 s"
            out["enrol_s"].append(time.perf_counter() - t)
        io1 = _io(serve.proc.pid)
        out["write_bytes_per_enrolment"] = (io1["write_bytes"] - io0["write_bytes"]) / len(names)
        out["wchar_per_enrolment"] = (io1["wchar"] - io0["wchar"]) / len(names)
        for k, name in enumerate(names[:max(3, len(names) // 2)]):
            item_id = f"new/{k}"
            t = time.perf_counter()
            assert serve.request("DELETE", f"/api/catalog/{item_id}", headers=AUTH)[0] == 200
            while top(name) == item_id:
                assert time.perf_counter() - t < 120
            out["remove_s"].append(time.perf_counter() - t)
        status, health = serve.request("GET", "/api/health", headers=AUTH)
        out["health_index"] = health["index"]
    finally:
        serve.stop()
    return out


def bench_burst(state: Path, n: int, merge_after: int, clients: int = 4) -> dict:
    """``n`` enrolments sent back to back by ``clients`` threads to a real serve that merges every ``merge_after``
    changes (so merges run under the burst): 202s and 503s, then every acknowledged id listed, after ``kill -9`` and
    a restart too."""
    import threading

    from edge_retrieval.imaging.codec import encode_jpeg
    from edge_retrieval.imaging.shipped_photos import photo_crops, shipped_photos
    from tests.support.serve import Serve
    crops = [encode_jpeg(img, 90) for _n, img in sorted(photo_crops(shipped_photos(), 8, seed=9).items())]
    cat_dir = state / "unused-catalog"
    cat_dir.mkdir(exist_ok=True)
    (cat_dir / "x.jpg").write_bytes(crops[0])
    serve = Serve(state, cat_dir, build_from=False, index_extra=f"  merge_after_items: {merge_after}\n")
    acked: list[str] = []
    busy = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(c, n, clients):
            item_id = f"burst/{k}"
            while True:
                status, _ = serve.upload("/api/catalog", crops[k % len(crops)], label=item_id, id=item_id)
                if status == 202:
                    with lock:
                        acked.append(item_id)
                    break
                assert status == 503, status
                with lock:
                    busy[0] += 1
                time.sleep(0.2)

    def listed() -> set[str]:
        ids: set[str] = set()
        while True:  # pages of at most 1000
            status, body = serve.request("GET", f"/api/catalog?q=burst/&limit=1000&offset={len(ids)}")
            assert status == 200, body
            ids |= {it["id"] for it in body["items"]}
            if not body["items"] or len(ids) >= body["total"]:
                return ids

    try:
        serve.start(timeout_s=600)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        burst_s = time.perf_counter() - t0
        time.sleep(1.0)
        missing_live = len(set(acked) - listed())
        status, health = serve.request("GET", "/api/health", headers={"Authorization": "Bearer s3cret-token"})
        serve.kill9()
        serve.start(timeout_s=600)
        missing_after = len(set(acked) - listed())
    finally:
        serve.stop()
    return {"enrolments": n, "acknowledged": len(acked), "busy_503": busy[0], "burst_s": round(burst_s, 1),
            "per_s": round(len(acked) / burst_s, 1), "missing_while_serving": missing_live,
            "missing_after_kill9": missing_after, "last_merge": health["index"]["last_merge"]}


def bench_query(state: Path, syn: Synthetic, enc, cfg, deltas: list[int], rounds: int) -> dict:
    """The live index with deltas of ``deltas`` items: query and lookup medians (alternating), memory per 1k."""
    from edge_retrieval.imaging.shipped_photos import shipped_photos
    from edge_retrieval.imaging.synthetic_views import camera_view
    from edge_retrieval.index.delta import DeltaChange, LiveIndex, single_threaded_blas
    from edge_retrieval.index.reader import CatalogIndex
    from edge_retrieval.search.lookup import Lookup
    single_threaded_blas()  # as serve does
    base = CatalogIndex.load(state / "index", expected_bundle_sha256=enc.sha256, search_k=cfg.index.search_k)
    photos = shipped_photos()
    frames = [camera_view(photos[p], "closeup", np.random.default_rng(s)) for s in range(3) for p in PHOTOS
              if p in photos]
    qvecs = [enc.embed(f) for f in frames]
    empty = LiveIndex(base, seq=base.store_seq[1], store_id=base.store_seq[0])
    lives = {0: empty}
    mem = {}
    import tracemalloc
    tracemalloc.start()
    for d in deltas:
        if not d:
            continue
        gc.collect()
        t0 = tracemalloc.get_traced_memory()[0]
        changes = [DeltaChange(it.id, k + 1, it) for k, it in enumerate(syn.items(d, f"delta{d}"))]
        live = empty.with_changes(changes, d)
        del changes
        gc.collect()
        mem[d] = (tracemalloc.get_traced_memory()[0] - t0) / 1e6  # what the delta keeps (numpy reports to tracemalloc)
        lives[d] = live
    tracemalloc.stop()
    rc = cfg.recognition.model_copy(update={"verify": False})  # the global path: the search is the largest share
    holder = {"idx": empty}

    class Source:
        def current(self):
            return holder["idx"]

    lookup = Lookup(enc, Source(), rc, top_k=cfg.index.top_k)
    q_ms = {d: [] for d in lives}
    l_ms = {d: [] for d in lives}
    for r in range(rounds):
        for d, live in lives.items():  # alternating: the machine's load hits every delta alike
            v = qvecs[r % len(qvecs)]
            t = time.perf_counter()
            live.query(v, 20)
            q_ms[d].append((time.perf_counter() - t) * 1e3)
            holder["idx"] = live
            t = time.perf_counter()
            lookup.lookup_rgb(frames[r % len(frames)])
            l_ms[d].append((time.perf_counter() - t) * 1e3)
    out = {"rounds": rounds, "delta_mb": {str(d): round(m, 2) for d, m in mem.items()},
           "delta_mb_per_1k": {str(d): round(m / d * 1000, 2) for d, m in mem.items()}}
    for d in lives:
        out[f"delta_{d}"] = {"query_ms": round(statistics.median(q_ms[d]), 3),
                             "lookup_ms": round(statistics.median(l_ms[d]), 2),
                             "query_ratio": round(statistics.median(q_ms[d]) / statistics.median(q_ms[0]), 2),
                             "lookup_ratio": round(statistics.median(l_ms[d]) / statistics.median(l_ms[0]), 3)}
    return out


def bench_merge(state: Path, syn: Synthetic, enc, cfg, n_delta: int) -> dict:
    """``n_delta`` enrolments kept in the store as serve keeps them (their encodings), the delta rebuilt from them (a
    start after kill -9), then one merge into a new base: its time and the bytes this process wrote."""
    from edge_retrieval.catalog.build import ItemMaker
    from edge_retrieval.catalog.service import CatalogService
    from edge_retrieval.catalog.store import CatalogStore
    from edge_retrieval.index.encoded_item import encode_item
    from edge_retrieval.index.holder import IndexHolder
    store = CatalogStore(state / "catalog.sqlite")
    items = list(syn.items(n_delta, "merge"))
    store.import_rows([(it.id, False, it.label, b"") for it in items], "bench_merge")  # the set-up: one transaction
    for it in items:
        store.put_encoded(it.id, store.get(it.id).seq, encode_item(it, enc.sha256))
    del items
    store.close()
    index = cfg.index.model_copy(update={"path": state / "index", "merge_after_items": 10**7})
    catalog = cfg.catalog.model_copy(update={"store": state / "catalog.sqlite", "enrolled_dir": state / "enrolled"})
    t0 = time.perf_counter()
    service = CatalogService(catalog, IndexHolder(index, expected_bundle_sha256=enc.sha256, dim=enc.dim),
                             ItemMaker(enc, cfg.recognition, cfg.index.thumbnail_px))
    service.apply()
    load_s = time.perf_counter() - t0
    delta = service.holder.current().delta_size
    io0, t0 = _io("self"), time.perf_counter()
    service.merge()
    merge_s, io1 = time.perf_counter() - t0, _io("self")
    health = service.index_health()
    service.stop()
    return {"delta_ids": delta, "delta_from_store_s": round(load_s, 2), "merge_s": round(merge_s, 1),
            "merge_write_mb": round((io1["write_bytes"] - io0["write_bytes"]) / 1e6, 1),
            "base_after": health.base_size, "delta_after": health.delta_items + health.delta_removed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks incremental", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 100000], help="base catalog sizes (items)")
    p.add_argument("--enrolments", type=int, default=10, help="HTTP enrolments per size (≤ 16 distinct photos)")
    p.add_argument("--deltas", type=int, nargs="*", default=[0, 1000, 10000], help="delta sizes for the query bench")
    p.add_argument("--rounds", type=int, default=200, help="queries per delta size")
    p.add_argument("--merge-delta", type=int, default=1000, help="delta (enrolments in the store) merged at the end")
    p.add_argument("--burst", type=int, default=0, help="enrolments sent back to back (with merges under way)")
    p.add_argument("--burst-merge-after", type=int, default=250, help="index.merge_after_items during the burst")
    p.add_argument("--skip-serve", action="store_true", help="leave out the real serve")
    p.add_argument("--skip-query", action="store_true", help="leave out the query and memory bench")
    args = p.parse_args(argv)
    import shutil

    from edge_retrieval.core.config import DEFAULT_BUNDLE
    from edge_retrieval.core.config_file import load_config
    from edge_retrieval.model.encoder import Encoder
    cfg = load_config(ROOT / "config.yaml")
    enc = Encoder.from_bundle(DEFAULT_BUNDLE, num_threads=2)
    syn = Synthetic(enc, cfg.recognition)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for n in args.sizes:
        state = WORK / f"state-{n}"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        write_s = write_base(state, n, syn, enc, cfg.index.n_trees)
        log(f"-- base of {n:,} items written in {write_s:.1f} s")
        entry: dict = {"base_items": n, "base_write_s": round(write_s, 1)}
        if not args.skip_serve:
            s = bench_serve(state, args.enrolments)
            entry["serve"] = {"start_s": s["start_s"], "enrol_to_searchable_s": {
                "median": round(statistics.median(s["enrol_s"]), 3), "max": round(max(s["enrol_s"]), 3)},
                "remove_to_gone_s": {"median": round(statistics.median(s["remove_s"]), 3),
                                     "max": round(max(s["remove_s"]), 3)},
                "write_mb_per_enrolment": round(s["write_bytes_per_enrolment"] / 1e6, 3),
                "wchar_mb_per_enrolment": round(s["wchar_per_enrolment"] / 1e6, 3),
                "enrolments": len(s["enrol_s"]), "health_index": s["health_index"]}
            log(f"   enrolment → searchable: median {entry['serve']['enrol_to_searchable_s']['median']} s, max "
                f"{entry['serve']['enrol_to_searchable_s']['max']} s; removal → gone: median "
                f"{entry['serve']['remove_to_gone_s']['median']} s; written per enrolment "
                f"{entry['serve']['write_mb_per_enrolment']} MB (handed to write(): "
                f"{entry['serve']['wchar_mb_per_enrolment']} MB)")
        if not args.skip_query:
            q = bench_query(state, syn, enc, cfg, args.deltas, args.rounds)
            entry["query"] = q
            for d in args.deltas:
                r = q[f"delta_{d}"]
                log(f"   delta {d:>6,}: query {r['query_ms']} ms (× {r['query_ratio']}), lookup {r['lookup_ms']} ms "
                    f"(× {r['lookup_ratio']})" + (f", the delta holds {q['delta_mb'][str(d)]} MB "
                                                 f"({q['delta_mb_per_1k'][str(d)]} MB per 1k items)" if d else ""))
        if args.burst:
            b = entry["burst"] = bench_burst(state, args.burst, args.burst_merge_after)
            log(f"   burst of {b['enrolments']:,} enrolments (4 clients): {b['acknowledged']:,} acknowledged in "
                f"{b['burst_s']} s ({b['per_s']}/s), {b['busy_503']} answers 503 (retried); acknowledged but not listed: "
                f"{b['missing_while_serving']} while serving, {b['missing_after_kill9']} after kill -9 and a restart")
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir(parents=True)
            write_base(state, n, syn, enc, cfg.index.n_trees)
        if args.merge_delta:
            m = entry["merge"] = bench_merge(state, syn, enc, cfg, args.merge_delta)
            log(f"   delta of {m['delta_ids']:,} ids rebuilt from the store in {m['delta_from_store_s']} s; merged into "
                f"a base of {m['base_after']:,} in {m['merge_s']} s, {m['merge_write_mb']} MB written")
        results.setdefault(f"base_{n}", {}).update(entry)
        shutil.rmtree(state, ignore_errors=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    enc.close()
    return 0
