"""edge-retrieval (or python -m device) serve|index build|query|catalog — the one place that wires components
and exits on error.

  edge-retrieval serve [--config config.yaml] [--host HOST] [--port PORT]
  python -m device index build --catalog DIR [--bundle DIR] [--out PATH] [--labels FILE] [--workers N] [--ray [ADDRESS]]
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
from typing import Callable

from .config import Config, load_config
from .errors import ApplianceError, CatalogIndexError, ConfigError, ImageError

log = logging.getLogger("device")
DEFAULT_CONFIG = "config.yaml"


def _positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (``--top-k 0`` used to fall back to the default, -1 to the whole list)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    # --config is accepted after the subcommand too (`python -m device serve --config config.yaml`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", parents=[common], help="run the appliance: camera, trigger, lookups, web page")
    s.add_argument("--host", default=None, help="listen address (overrides web.host; 127.0.0.1 = this machine only)")
    s.add_argument("--port", type=_positive_int, default=None, help="listen port (overrides web.port)")
    idx = sub.add_parser("index", help="catalog index commands").add_subparsers(dest="index_cmd", required=True)
    b = idx.add_parser("build", parents=[common],
                       help="index a folder of images (id = relative path without extension)")
    b.add_argument("--catalog", type=Path, required=True, help="folder of catalog images")
    b.add_argument("--bundle", type=Path, default=None, help="model bundle (default: encoder.bundle)")
    b.add_argument("--out", type=Path, default=None, help="index folder (default: index.path)")
    b.add_argument("--labels", type=Path, default=None, help="CSV/TSV/JSON of id → label")
    b.add_argument("--workers", type=_positive_int, default=None,
                   help="local worker processes (default: build.workers; 1 = in process)")
    b.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the per-item work on Ray: a local Ray without ADDRESS, else a cluster (auto, "
                        "HOST:6379, ray://HOST:10001); default: build.ray / build.ray_address")
    q = sub.add_parser("query", parents=[common], help="look up image files")
    q.add_argument("images", nargs="+", type=Path)
    q.add_argument("--index", type=Path, default=None, help="index folder (default: index.path)")
    q.add_argument("--bundle", type=Path, default=None, help="model bundle (default: encoder.bundle)")
    q.add_argument("--top-k", type=_positive_int, default=None, help="results per query, ≥ 1 (default: index.top_k)")
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
    from .encoder import load_encoder  # a --bundle named on the command line gets no fallback
    return load_encoder(cfg.encoder if bundle is None else cfg.encoder.model_copy(update={"bundle": bundle,
                                                                                        "fallback_bundle": None}))


def _holder(cfg: Config, encoder, path: Path | None = None, create_empty: bool = False):
    from .index_holder import IndexHolder
    index = cfg.index if path is None else cfg.index.model_copy(update={"path": path})
    return IndexHolder(index, expected_bundle_sha256=encoder.sha256, create_empty=create_empty, dim=encoder.dim,
                       require_features=cfg.recognition.require_features, recover=create_empty)


def _catalog(cfg: Config, encoder, set_aside: list[dict] | None = None):
    """The catalog service (store + live index + item maker) that HTTP and the CLI both change the catalog through."""
    from .catalog_service import CatalogService
    return CatalogService(cfg.catalog, _holder(cfg, encoder, create_empty=True), _maker(cfg, encoder),
                          max_pixels=cfg.web.max_pixels, set_aside=set_aside)


def _maker(cfg: Config, encoder):
    from .catalog import ItemMaker
    return ItemMaker(encoder, cfg.recognition, cfg.index.thumbnail_px)


def _lookup(cfg: Config, encoder, holder, top_k: int | None = None):
    from .lookup import Lookup
    return Lookup(encoder, holder, cfg.recognition, top_k=top_k or cfg.index.top_k, max_pixels=cfg.web.max_pixels)


def _build(cfg: Config, encoder, folder: Path, out: Path, labels: Path | None, allow_empty: bool = False,
           workers: int | None = None, ray: str | None = None) -> None:
    from .build_pool import report_text, runner_for
    from .catalog import build_index, load_labels
    maker = _maker(cfg, encoder)
    rep = build_index(folder, maker, out, n_trees=cfg.index.n_trees, labels=load_labels(labels),
                      max_pixels=cfg.web.max_pixels, progress=sys.stderr.isatty(), allow_empty=allow_empty,
                      runner=runner_for(cfg.build, maker, workers=workers, ray=ray))
    print(f"indexed {rep.indexed} images from {folder} into {out}: {report_text(rep)}", file=sys.stderr)


def cmd_index_build(cfg: Config, args) -> int:
    out = args.out or cfg.index.path
    encoder = _encoder(cfg, args.bundle)
    previous = _describe_index(out)
    _build(cfg, encoder, args.catalog, out, args.labels or cfg.catalog.labels, workers=args.workers, ray=args.ray)
    if Path(out).resolve() == Path(cfg.index.path).resolve():  # this device's index: the store's changes on top
        catalog = _catalog(cfg, encoder)
        rep = catalog.apply()
        catalog.stop()
        print(f"catalog store: {len(rep.enrolled)} enrolled, {len(rep.removed)} removed on top (change {rep.seq})", file=sys.stderr)
    if previous:  # the index may be the one a running `serve` has loaded: it switches to it, never undoes it
        print(f"replaced {previous} in {out}; a running `serve` switches to it within a few seconds", file=sys.stderr)
    return 0


def _describe_index(path: Path) -> str | None:
    """'gen-000003 (14 items)' for the live generation at ``path``, None when there is none."""
    from .index import CatalogIndex, read_current_name
    name = read_current_name(path)
    if name is None:
        return None
    try:
        with CatalogIndex.load(path, expected_bundle_sha256=None) as idx:
            return f"{name} ({idx.size} items)"
    except CatalogIndexError as e:
        return f"{name} (unreadable: {e})"


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
    from .images import read_image
    catalog = _catalog(cfg, _encoder(cfg))
    holder = catalog.holder
    try:
        if args.catalog_cmd == "list":
            for it in holder.current().items:
                print(f"{it.id}\t{it.label}")
            return 0
        if args.catalog_cmd == "remove":  # the same path as DELETE /api/catalog: committed, then indexed
            missing = [i for i in args.ids if catalog.remove(i) is None]
            catalog.apply()
            print(f"removed {len(args.ids) - len(missing)}; index now has {holder.current().size} items",
                  file=sys.stderr)
            if missing:
                raise CatalogIndexError(f"not in the catalog: {', '.join(missing)}")
            return 0
        if args.item_id and len(args.images) > 1:
            raise CatalogIndexError("--id names one item: give one image with it")
        ids = []
        for p in args.images:  # the same path as an HTTP enrolment: validated, committed, then indexed
            item_id = args.item_id or p.stem
            ids.append(catalog.enrol(read_image(p, cfg.web.max_pixels), item_id,
                                     args.label or item_id.rsplit("/", 1)[-1])["id"])
        catalog.apply()
        print(f"enrolled {', '.join(ids)}; index now has {holder.current().size} items", file=sys.stderr)
        return 0
    finally:
        catalog.stop()


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
        if cfg.web.api_token is None:  # so the demo's catalog manager can be tried; a device sets its own token
            import secrets
            updates["web"] = cfg.web.model_copy(update={"api_token": secrets.token_urlsafe(12)})
            log.info("demo: catalog changes on the page need this token (valid until restart): %s",
                     updates["web"].api_token)
        cfg = cfg.model_copy(update=updates)
    elif cfg.camera.source == "demo":
        raise ApplianceError("camera.source is 'demo' but catalog.demo is false: set a real source "
                             "(/dev/video0, csi://0, rtsp://…) or enable the demo")
    if cfg.catalog.build_from and _needs_build(cfg.index.path, encoder):
        log.info("building the index at %s from %s", cfg.index.path, cfg.catalog.build_from)
        _build(cfg, encoder, cfg.catalog.build_from, cfg.index.path, cfg.catalog.labels, allow_empty=True)
        # the items enrolled at run time come back, and removed ones stay out: serve replays the store next
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
    from .appliance import Appliance
    from .camera import Camera
    from .camera_sources import redact
    from .history import History
    from .index_writer import recover_index
    from .store import hold_serve_lock
    from .trigger import Trigger
    from .web import create_app, serve
    _check_port_free(cfg)  # before seconds of index work, not after them
    lock = hold_serve_lock(cfg.catalog.store)  # noqa: F841 - held (flock) until this process exits
    encoder = _encoder(cfg)
    set_aside = recover_index(cfg.index.path)  # damaged generations out of the way before deciding to build
    cfg = _prepare_catalog(cfg, encoder)
    catalog = _catalog(cfg, encoder, set_aside)
    holder, sinks = catalog.holder, _event_sinks(cfg)
    appliance = Appliance(lookup=_lookup(cfg, encoder, holder), catalog=catalog, camera=Camera(cfg.camera),
                          trigger=Trigger(cfg.trigger) if cfg.trigger.enabled else None,
                          max_parallel_uploads=cfg.web.max_parallel_uploads, sinks=sinks,
                          sink_interval_s=cfg.mqtt.state_interval_s, history=History(cfg.history),
                          summary_interval_s=cfg.history.summary_interval_s, sse=cfg.sse)
    for sink in sinks:  # the Home Assistant "look up now" button
        if hasattr(sink, "on_lookup_command"):
            sink.on_lookup_command(appliance.request_lookup)
    appliance.start()  # replays the catalog store onto the index first
    w = cfg.web
    log.info("config %s: bundle %s (%s), index %s items (%s), camera %s, web %s:%d, catalog changes %s",
             cfg.source_file or "(defaults)", encoder.manifest.name, encoder.manifest.quantization,
             holder.current().size, cfg.index.path, redact(cfg.camera.source), w.host, w.port,
             "enabled" if w.api_token else "disabled (no web.api_token)")
    log.info("open the page: %s", "  ".join(page_urls(w.host, w.port)))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    _notify_systemd(lambda: watchdog_check(appliance, http_probe(w.host, w.port)))
    try:
        serve(create_app(w, appliance), w)
    except KeyboardInterrupt:
        pass
    finally:
        appliance.stop()
        for sink in sinks:  # MQTT says "offline" on a clean stop
            sink.stop()
    return 0


def _with_listen_flags(cfg: Config, args) -> Config:
    """``serve --host/--port`` override ``web.host``/``web.port`` (validated like the config's values)."""
    update = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if not update:
        return cfg
    try:
        web = type(cfg.web).model_validate({**cfg.web.model_dump(), **update})
    except ValueError as e:
        raise ConfigError(f"--host/--port: {e}") from None
    return cfg.model_copy(update={"web": web})


def page_urls(host: str, port: int) -> list[str]:
    """Clickable addresses of the page: 127.0.0.1 (when it listens there), and the machine's LAN address when
    it listens on every interface (0.0.0.0 / ::) — a wildcard is not an address a browser can open."""
    import socket
    if host not in ("0.0.0.0", "::", ""):
        return [f"http://{host}:{port}/"]
    urls = [f"http://127.0.0.1:{port}/"]
    try:  # the source address of a route out; a UDP connect sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            lan = s.getsockname()[0]
        if not lan.startswith("127."):
            urls.append(f"http://{lan}:{port}/")
    except OSError:
        pass
    return urls


def _event_sinks(cfg: Config) -> list:
    """The MQTT publisher and the webhook notifier that the config enables, started."""
    from .events import MqttPublisher, WebhookNotifier
    sinks: list = []
    if cfg.mqtt.enabled:
        sinks.append(MqttPublisher(cfg.mqtt).start())
    if cfg.webhook.enabled:
        sinks.append(WebhookNotifier(cfg.webhook, cfg.mqtt.device_id).start())
    return sinks


def _check_port_free(cfg: Config) -> None:
    """Bind ``web.host:web.port`` the way waitress will (SO_REUSEADDR) and let go; ConfigError if taken."""
    import socket
    w = cfg.web
    where = cfg.source_file or "config.yaml"
    try:
        infos = socket.getaddrinfo(w.host, w.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ConfigError(f"{where}: web.host {w.host!r} cannot be resolved ({e})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                raise ConfigError(
                    f"{where}: cannot listen on web.host {w.host} web.port {w.port} ({e.strerror or e}): another "
                    "server (or another appliance) is using it — stop it, or set another web.port (or web.host)"
                ) from None


def http_probe(host: str, port: int, timeout_s: float = 5.0) -> Callable[[], tuple[bool, str]]:
    """A check that the web server answers ``GET /api/health`` on ``host:port`` (a wildcard host is asked
    on loopback). Any HTTP answer counts, 503 too: that is a lost camera, and the camera has its own check."""
    import urllib.error
    import urllib.request
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}/api/health"

    def probe() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass
        except OSError as e:  # refused, timed out, reset
            return False, f"web server did not answer {url} within {timeout_s:g} s ({e})"
        return True, "web server answers"
    return probe


def watchdog_check(appliance, probe: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    """Whether the service deserves a systemd watchdog ping: the camera loop and the camera's watchdog run
    (``appliance.alive()``) and the web server answers (``probe()``). Returns (ok, why)."""
    ok, why = appliance.alive()
    web_ok, web_why = probe() if ok else (False, "")  # the web server is asked only while the loop is alive
    return (web_ok, f"{why}; {web_why}") if ok else (False, why)


def _notify_systemd(check: Callable[[], tuple[bool, str]]) -> None:
    """READY=1, then (with WatchdogSec) WATCHDOG=1 every half period while ``check()`` passes (a wedged camera
    loop or web server stops the pings: systemd restarts the service); each check also goes out as STATUS=."""
    import os
    import socket
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]

    def send(msg: str) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                s.send(msg.encode())
        except OSError as e:
            log.warning("systemd notify socket %s: %s", addr, e)

    send("READY=1\nSTATUS=starting the web server")
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if not usec:
        return

    def ping() -> None:
        failing = None
        while not threading.Event().wait(usec / 2e6):
            ok, why = check()
            if ok:
                if failing:
                    log.warning("systemd watchdog: healthy again (%s); pinging again", why)
                failing = None
                send(f"WATCHDOG=1\nSTATUS={why}")
            else:
                # Stop pinging (systemd restarts us after WatchdogSec); say why once, not every period.
                if why != failing:
                    log.error("systemd watchdog: %s; not pinging, systemd will restart the service", why)
                    send(f"STATUS=unhealthy: {why}")
                failing = why
    threading.Thread(target=ping, daemon=True, name="sd-watchdog").start()


def main(argv: list[str] | None = None) -> int:
    """Entry point: the only place errors become exit codes (2 = bad config/bundle/index, 1 = a query failed)."""
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
        logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.cmd == "serve":
            return cmd_serve(_with_listen_flags(cfg, args))
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
