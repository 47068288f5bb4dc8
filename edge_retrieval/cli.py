"""edge-retrieval: recognise which catalog items a camera sees, offline.

  edge-retrieval index build --catalog DIR     index a folder of photos (one photo per item; the file name is its id)
  edge-retrieval query PHOTO... [--json]       which catalog item is in each photo
  edge-retrieval serve                         the appliance: camera, lookups, the web page, MQTT
  edge-retrieval catalog add|remove|list       change the catalog of a stopped or running appliance

Settings come from --config FILE, else ./config.yaml if present, else the defaults (no camera, the index in
./var/catalog, the SSCD bundle when its package is installed, the open bundle otherwise). Docs: docs/ in the
source, or README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from edge_retrieval.app import wiring
from edge_retrieval.core.config import Config
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import ApplianceError, CatalogIndexError, ConfigError, ImageError

log = logging.getLogger("edge_retrieval")
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
    # --config is accepted after the subcommand too (`python -m edge_retrieval serve --config config.yaml`)
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
    b.add_argument("--bundle", type=Path, default=None, help="a shipped bundle's name or a bundle folder (default: encoder.bundle)")
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
    q.add_argument("--bundle", type=Path, default=None, help="a shipped bundle's name or a bundle folder (default: encoder.bundle)")
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


def cmd_index_build(cfg: Config, args) -> int:
    from edge_retrieval.catalog.build_workers import report_text
    out = args.out or cfg.index.path
    encoder = wiring.load(cfg, args.bundle)
    previous = _describe_index(out)
    rep = wiring.build_catalog(cfg, encoder, args.catalog, out, labels=args.labels, workers=args.workers,
                               ray=args.ray, progress=sys.stderr.isatty())
    print(f"indexed {rep.indexed} images from {args.catalog} into {out}: {report_text(rep)}", file=sys.stderr)
    if Path(out).resolve() == Path(cfg.index.path).resolve():  # this device's index: the store's changes on top
        catalog = wiring.catalog_service(cfg, encoder)
        rep = catalog.apply()
        catalog.stop()
        print(f"catalog store: {len(rep.enrolled)} enrolled, {len(rep.removed)} removed on top (change {rep.seq})", file=sys.stderr)
    if previous:  # the index may be the one a running `serve` has loaded: it switches to it, never undoes it
        print(f"replaced {previous} in {out}; a running `serve` switches to it within a few seconds", file=sys.stderr)
    return 0


def _describe_index(path: Path) -> str | None:
    """'gen-000003 (14 items)' for the live generation at ``path``, None when there is none."""
    from edge_retrieval.index.reader import CatalogIndex, read_current_name
    name = read_current_name(path)
    if name is None:
        return None
    try:
        with CatalogIndex.load(path, expected_bundle_sha256=None) as idx:
            return f"{name} ({idx.size} items)"
    except CatalogIndexError as e:
        return f"{name} (unreadable: {e})"


def cmd_query(cfg: Config, args) -> int:
    encoder = wiring.load(cfg, args.bundle)
    catalog = None
    if (args.index is None or Path(args.index).resolve() == Path(cfg.index.path).resolve()) \
            and Path(cfg.catalog.store).is_file():  # this device's index: the changes in its delta count too
        catalog = wiring.catalog_service(cfg, encoder)
        catalog.apply()
    index = catalog.holder if catalog is not None else wiring.open_index(cfg, encoder, args.index)
    try:
        return _query(wiring.build_lookup(cfg, encoder, index, top_k=args.top_k), args)
    finally:
        if catalog is not None:
            catalog.stop()


def _query(lookup, args) -> int:
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
    from edge_retrieval.imaging.codec import read_image
    catalog = wiring.catalog_service(cfg, wiring.load(cfg))
    holder = catalog.holder
    try:
        if args.catalog_cmd == "list":
            catalog.apply()  # the changes in the delta beside the generation are in the catalog too
            for it in holder.current().items:
                print(f"{it.id}\t{it.label}")
            return 0
        if args.catalog_cmd == "remove":  # the same path as DELETE /api/catalog: committed, then indexed
            missing = [i for i in args.ids if catalog.remove(i) is None]
            _apply(catalog)
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
            ids.append(catalog.enrol(read_image(p, cfg.images.max_pixels), item_id,
                                     args.label or item_id.rsplit("/", 1)[-1])["id"])
        _apply(catalog)
        print(f"enrolled {', '.join(ids)}; index now has {holder.current().size} items", file=sys.stderr)
        return 0
    finally:
        catalog.stop()


def _apply(catalog) -> None:
    """The changes into the index's delta (a running `serve` sees them in about a second), and the merge into a new
    generation when the delta has grown to ``index.merge_after_items`` — what `serve` does, in the foreground."""
    catalog.apply()
    if catalog.merge_due():
        catalog.merge()
        print(f"merged the changes into {catalog.holder.current().generation}", file=sys.stderr)


def cmd_serve(cfg: Config) -> int:
    from edge_retrieval.app.systemd import http_probe, notify_systemd, page_urls, watchdog_check
    from edge_retrieval.capture.sources import redact
    from edge_retrieval.catalog.store import hold_serve_lock
    from edge_retrieval.index.writer import recover_index
    from edge_retrieval.web import create_app, serve
    _check_port_free(cfg)  # before seconds of index work, not after them
    lock = hold_serve_lock(cfg.catalog.store)  # noqa: F841 - held (flock) until this process exits
    encoder = wiring.load(cfg)
    set_aside = recover_index(cfg.index.path)  # damaged generations out of the way before deciding to build
    cfg = wiring.prepare_catalog(cfg, encoder)
    appliance = wiring.build_appliance(cfg, encoder, set_aside=set_aside)
    appliance.start()  # replays the catalog store onto the index first
    w = cfg.web
    log.info("config %s: bundle %s (%s), index %s items (%s), camera %s, web %s:%d, catalog changes %s",
             cfg.source_file or "(defaults)", encoder.manifest.name, encoder.manifest.quantization,
             appliance.catalog.holder.current().size, cfg.index.path, redact(cfg.camera.source), w.host, w.port,
             "enabled" if w.api_token else "disabled (no web.api_token)")
    log.info("open the page: %s", "  ".join(page_urls(w.host, w.port)))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    notify_systemd(lambda: watchdog_check(appliance, http_probe(w.host, w.port)))
    try:
        serve(create_app(w, appliance), w)
    except KeyboardInterrupt:
        pass
    finally:
        appliance.stop()  # MQTT says "offline" on a clean stop
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
