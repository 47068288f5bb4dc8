"""python -m device serve|index build|query|catalog — the one place that wires components and exits on error.

  python -m device serve [--config config.yaml]
  python -m device index build --catalog DIR [--bundle DIR] [--out PATH] [--labels FILE]
  python -m device query IMAGE... [--index PATH] [--top-k K] [--json]
  python -m device catalog add IMAGE... [--label L] [--id ID]   |   catalog remove ID...   |   catalog list
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import Config, load_config
from .errors import ApplianceError, CatalogIndexError, ImageError

log = logging.getLogger("device")
DEFAULT_CONFIG = "config.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    # --config is accepted after the subcommand too (`python -m device serve --config config.yaml`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", parents=[common], help="run the appliance: camera, trigger, lookups, web page")
    idx = sub.add_parser("index", help="catalog index commands").add_subparsers(dest="index_cmd", required=True)
    b = idx.add_parser("build", parents=[common],
                       help="index a folder of images (id = relative path without extension)")
    b.add_argument("--catalog", type=Path, required=True, help="folder of catalog images")
    b.add_argument("--bundle", type=Path, default=None, help="model bundle (default: encoder.bundle)")
    b.add_argument("--out", type=Path, default=None, help="index folder (default: index.path)")
    b.add_argument("--labels", type=Path, default=None, help="CSV/TSV/JSON of id → label")
    q = sub.add_parser("query", parents=[common], help="look up image files")
    q.add_argument("images", nargs="+", type=Path)
    q.add_argument("--index", type=Path, default=None, help="index folder (default: index.path)")
    q.add_argument("--bundle", type=Path, default=None, help="model bundle (default: encoder.bundle)")
    q.add_argument("--top-k", type=int, default=None)
    q.add_argument("--json", action="store_true", help="one JSON line per query")
    c = sub.add_parser("catalog", help="enrol or remove items").add_subparsers(dest="catalog_cmd", required=True)
    a = c.add_parser("add", parents=[common], help="enrol images (replaces an item with the same id)")
    a.add_argument("images", nargs="+", type=Path)
    a.add_argument("--label", default=None, help="label (default: the file name)")
    a.add_argument("--id", dest="item_id", default=None, help="id (one image only; default: file stem)")
    r = c.add_parser("remove", parents=[common], help="remove items by id")
    r.add_argument("ids", nargs="+")
    c.add_parser("list", parents=[common], help="list items")
    return p


def _config(args) -> Config:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load_config(path)


def _encoder(cfg: Config, bundle: Path | None = None):
    from .encoder import Encoder
    return Encoder.from_bundle(bundle or cfg.encoder.bundle, num_threads=cfg.encoder.num_threads)


def _holder(cfg: Config, encoder, path: Path | None = None, create_empty: bool = False):
    from .index import IndexHolder
    return IndexHolder(path or cfg.index.path, expected_bundle_sha256=encoder.sha256, search_k=cfg.index.search_k,
                       n_trees=cfg.index.n_trees, create_empty=create_empty, dim=encoder.dim,
                       require_features=cfg.recognition.require_features)


def _recognition(cfg: Config):
    """(Enrolment, RecognitionConfig) from the config's recognition section."""
    from .catalog import Enrolment
    from .lookup import RecognitionConfig
    from .verify import VerifyConfig
    r = cfg.recognition
    features = VerifyConfig(n_features=r.n_features, query_n_features=r.query_n_features, ratio=r.ratio,
                            ransac_reproj_px=r.ransac_reproj_px, ransac_iters=r.ransac_iters)
    enrolment = Enrolment(views=tuple(r.enrol_views), features=features if r.features else None,
                          thumbnail_px=cfg.index.thumbnail_px)
    recognition = RecognitionConfig(query_crops=tuple(r.query_crops), verify=r.verify, verify_top_k=r.verify_top_k,
                                    verify_below_score=r.verify_below_score, stop_inliers=r.stop_inliers,
                                    accept_inliers=r.accept_inliers, accept_score=r.accept_score,
                                    fusion_weight=r.fusion_weight, features=features)
    return enrolment, recognition


def _lookup(cfg: Config, encoder, holder, top_k: int | None = None):
    from .lookup import Lookup
    return Lookup(encoder, holder, top_k=top_k or cfg.index.top_k, max_pixels=cfg.web.max_pixels,
                  recognition=_recognition(cfg)[1])


def _build(cfg: Config, encoder, folder: Path, out: Path, labels: Path | None) -> None:
    from .catalog import build_index, load_labels
    rep = build_index(folder, encoder, out, labels=load_labels(labels), n_trees=cfg.index.n_trees,
                      enrolment=_recognition(cfg)[0], max_pixels=cfg.web.max_pixels,
                      progress=sys.stderr.isatty())
    print(f"indexed {rep.indexed} images from {folder} into {out} ({rep.generation}) in {rep.seconds:.1f} s; "
          f"skipped {len(rep.skipped)}", file=sys.stderr)
    for rel, why in rep.skipped:
        print(f"  skipped {rel}: {why}", file=sys.stderr)


def cmd_index_build(cfg: Config, args) -> int:
    encoder = _encoder(cfg, args.bundle)
    _build(cfg, encoder, args.catalog, args.out or cfg.index.path, args.labels or cfg.catalog.labels)
    return 0


def cmd_query(cfg: Config, args) -> int:
    encoder = _encoder(cfg, args.bundle)
    lookup = _lookup(cfg, encoder, _holder(cfg, encoder, args.index), args.top_k)
    failures = 0
    for path in args.images:
        try:
            result = lookup.lookup_bytes(path.read_bytes(), source="cli")
        except (ImageError, OSError) as e:
            failures += 1
            msg = str(e) if isinstance(e, ImageError) else f"{path}: {e.strerror or e}"
            if args.json:
                print(json.dumps({"query": str(path), "error": msg}), flush=True)
            else:
                print(f"{path}: error: {msg}", file=sys.stderr)
            continue
        if args.json:
            out = result.to_json()
            print(json.dumps({"query": str(path), "match": out["match"], "results": out["results"],
                              "timings_ms": out["timings_ms"]}), flush=True)
        else:
            m = result.match
            verdict = (f"match {m.id}" + (f" · verified, {m.inliers} matching points" if m.inliers else "")
                       if m else "no match")
            print(f"{path}  {verdict}  ({result.timings_ms['total']:.1f} ms)")
            for rank, c in enumerate(result.results, 1):
                print(f"  {rank}. {c.score:.3f}  {c.id}  {c.label}")
    return 1 if failures else 0


def cmd_catalog(cfg: Config, args) -> int:
    from .camera import read_image
    from .catalog import make_item
    encoder = _encoder(cfg)
    holder = _holder(cfg, encoder, create_empty=True)
    if args.catalog_cmd == "list":
        for it in holder.index.items:
            print(f"{it.id}\t{it.label}")
        return 0
    if args.catalog_cmd == "remove":
        removed = holder.remove(args.ids)
        missing = [i for i in args.ids if i not in removed]
        print(f"removed {len(removed)}; index now has {holder.index.size} items", file=sys.stderr)
        if missing:
            raise CatalogIndexError(f"not in the catalog: {', '.join(missing)}")
        return 0
    if args.item_id and len(args.images) > 1:
        raise CatalogIndexError("--id names one item: give one image with it")
    enrolment = _recognition(cfg)[0]
    items = [make_item(encoder, read_image(p, cfg.web.max_pixels), args.item_id or p.stem, args.label,
                       source=str(p.resolve()), enrolment=enrolment) for p in args.images]
    holder.add(items)
    print(f"enrolled {', '.join(i.id for i in items)}; index now has {holder.index.size} items", file=sys.stderr)
    return 0


def _prepare_catalog(cfg: Config, encoder) -> Config:
    """Materialise the demo and build the index from catalog.build_from when no index exists yet."""
    if cfg.catalog.demo:
        from .demo import materialise_demo
        root = cfg.index.path.parent / "demo"
        catalog, video = materialise_demo(root)
        log.info("demo: catalog %s, camera %s", catalog, video)
        updates = {"catalog": cfg.catalog.model_copy(update={"build_from": cfg.catalog.build_from or catalog})}
        if cfg.camera.source == "demo":
            updates["camera"] = cfg.camera.model_copy(update={"source": str(video), "fps": cfg.camera.fps or 10.0})
        cfg = cfg.model_copy(update=updates)
    elif cfg.camera.source == "demo":
        raise ApplianceError("camera.source is 'demo' but catalog.demo is false: set a real source "
                             "(/dev/video0, csi://0, rtsp://…) or enable the demo")
    if cfg.catalog.build_from and _needs_build(cfg.index.path, encoder):
        log.info("building the index at %s from %s", cfg.index.path, cfg.catalog.build_from)
        _build(cfg, encoder, cfg.catalog.build_from, cfg.index.path, cfg.catalog.labels)
        from .catalog import EnrolledStore
        enrolled = EnrolledStore(cfg.catalog.enrolled_dir).items(encoder, _recognition(cfg)[0], cfg.web.max_pixels)
        if enrolled:
            _holder(cfg, encoder).add(enrolled)
            log.info("re-enrolled %d items kept in %s", len(enrolled), cfg.catalog.enrolled_dir)
    return cfg


def _needs_build(path: Path, encoder) -> bool:
    """No index yet, or one made with another bundle / unreadable: rebuild it from the catalog folder."""
    from .index import CatalogIndex, index_exists
    if not index_exists(path):
        return True
    try:
        with CatalogIndex.load(path, expected_bundle_sha256=None) as idx:
            if idx.bundle_sha256 == encoder.sha256:
                return False
            log.warning("index %s was built with another bundle (%s…): rebuilding it", path, idx.bundle_sha256[:12])
    except CatalogIndexError as e:
        log.warning("index %s is unusable (%s): rebuilding it", path, e)
    return True


def cmd_serve(cfg: Config) -> int:
    from .camera import Camera
    from .service import Appliance
    from .trigger import Trigger, TriggerConfig
    from .web import WebSettings, create_app, serve
    encoder = _encoder(cfg)
    cfg = _prepare_catalog(cfg, encoder)
    holder = _holder(cfg, encoder, create_empty=True)
    lookup = _lookup(cfg, encoder, holder)
    cam = cfg.camera
    camera = Camera(cam.source, fps=cam.fps, stall_timeout_s=cam.stall_timeout_s, backoff_initial_s=cam.backoff_initial_s,
                    backoff_max_s=cam.backoff_max_s, loop=cam.loop, width=cam.width, height=cam.height)
    t = cfg.trigger
    trigger = Trigger(TriggerConfig(t.motion_threshold, t.still_threshold, t.still_time_s, t.min_sharpness,
                                    t.min_interval_s, t.analysis_width_px)) if t.enabled else None
    sinks = _event_sinks(cfg)  # events (issue 14)
    app_services = Appliance(lookup=lookup, holder=holder, camera=camera, trigger=trigger,
                             enrolled_dir=cfg.catalog.enrolled_dir, enrolment=_recognition(cfg)[0],
                             sinks=sinks, sink_interval_s=cfg.mqtt.state_interval_s).start()
    for sink in sinks:  # events (issue 14): the Home Assistant "look up now" button
        if hasattr(sink, "on_lookup_command"):
            sink.on_lookup_command(app_services.request_lookup)
    w = cfg.web
    web = WebSettings(host=w.host, port=w.port, max_upload_mb=w.max_upload_mb, api_token=w.api_token,
                      stream_fps=w.stream_fps)
    log.info("config %s: bundle %s (%s), index %s items (%s), camera %s, web http://%s:%d, catalog changes %s",
             cfg.source_file or "(defaults)", encoder.manifest.name, encoder.manifest.quantization,
             holder.index.size, cfg.index.path, cam.source, w.host, w.port,
             "enabled" if w.api_token else "disabled (no web.api_token)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    _notify_systemd()
    try:
        serve(create_app(web, app_services), web, threads=w.threads)
    except KeyboardInterrupt:
        pass
    finally:
        app_services.stop()
        for sink in sinks:  # events (issue 14): MQTT says "offline" on a clean stop
            sink.stop()
    return 0


def _event_sinks(cfg: Config) -> list:
    """events (issue 14): the MQTT publisher and the webhook notifier that config enables, started."""
    from .events import MqttPublisher, WebhookNotifier
    sinks: list = []
    if cfg.mqtt.enabled:
        sinks.append(MqttPublisher(cfg.mqtt).start())
    if cfg.webhook.enabled:
        sinks.append(WebhookNotifier(cfg.webhook, cfg.mqtt.device_id).start())
    return sinks


def _notify_systemd() -> None:
    """READY=1 and a watchdog ping thread when run under systemd (Type=notify, WatchdogSec)."""
    import os
    import socket
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]

    def send(msg: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.send(msg)

    send(b"READY=1")
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec:
        def ping() -> None:
            while True:
                threading.Event().wait(usec / 2e6)
                send(b"WATCHDOG=1")
        threading.Thread(target=ping, daemon=True, name="sd-watchdog").start()


def main(argv: list[str] | None = None) -> int:
    """Entry point: the only place errors become exit codes (2 = bad config/bundle/index, 1 = a query failed)."""
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
        logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.cmd == "serve":
            return cmd_serve(cfg)
        if args.cmd == "index":
            return cmd_index_build(cfg, args)
        if args.cmd == "query":
            return cmd_query(cfg, args)
        return cmd_catalog(cfg, args)
    except ApplianceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
