"""edge-retrieval: recognise which catalog items a camera sees, offline.

  edge-retrieval init FOLDER                   a place for your own catalog: FOLDER/config.yaml + FOLDER/catalog/
  edge-retrieval index build --catalog DIR     index a folder of photos (one photo per item; the file name is its id)
  edge-retrieval query PHOTO... [--json]       which catalog item is in each photo
  edge-retrieval serve                         the appliance: camera, lookups, the web page, MQTT
  edge-retrieval catalog add|remove|list       change the catalog of a stopped or running appliance
  edge-retrieval catalog export|import FILE    back up, restore or move a whole catalog (one archive file)

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

from edge_retrieval import __version__
from edge_retrieval.app import wiring
from edge_retrieval.core.config import Config
from edge_retrieval.core.config_file import load_config
from edge_retrieval.core.errors import ApplianceError, CatalogIndexError, ConfigError, ImageError, InputError
from edge_retrieval.core.photos import item_of
from edge_retrieval.core.results import confidence

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
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"your settings (default: ./{DEFAULT_CONFIG} if there is one, else the defaults)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # --config is accepted after the subcommand too (`python -m edge_retrieval serve --config config.yaml`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"your settings (default: ./{DEFAULT_CONFIG} if there is one)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(parent, name: str, text: str, more: str = "", **kw):
        return parent.add_parser(name, help=text, description=text[0].upper() + text[1:] + "." + more, **kw)

    bundle = "the model: a shipped bundle's name (sscd-distilled, efficientnet-lite0, …) or a bundle folder " \
             "(default: encoder.bundle)"
    i = command(sub, "init", "start a catalog of your own in FOLDER, apart from the demo",
                " It writes FOLDER/config.yaml (your camera, a random API token for the page's catalog manager) and "
                "makes FOLDER/catalog/ for your photos, one per item; `serve --config FOLDER/config.yaml` indexes "
                "them at its first start. Everything the appliance keeps (index, catalog store, history) lives in "
                "FOLDER/var/.")
    i.add_argument("folder", type=Path, metavar="FOLDER", help="where your appliance lives, e.g. ~/shop")
    i.add_argument("--camera", default="/dev/video0", metavar="SOURCE",
                   help="the camera: /dev/videoN or N, csi://0, rtsp://…, a video file, a folder of images, or none "
                        "(uploads only); default /dev/video0")
    s = command(sub, "serve", "run the appliance: camera, lookups, the web page, MQTT and webhooks", parents=[common],
                more=" Stop it with Ctrl-C (or SIGTERM); the log says where the page is.")
    s.add_argument("--host", default=None, help="listen address (overrides web.host; 127.0.0.1 = this machine only)")
    s.add_argument("--port", type=_positive_int, default=None, help="listen port (overrides web.port)")
    idx = command(sub, "index", "build the catalog's index from a folder of photos")
    b = command(idx.add_subparsers(dest="index_cmd", required=True, metavar="COMMAND"), "build",
                "index a folder of photos, one per item", parents=[common],
                more=" Any file name: an item's id is the photo's path in the folder without its extension "
                     "(shelf/red-mug.jpg → shelf/red-mug; brackets, commas and such become _), its label the file name "
                     "as written. Items enrolled later (page, `catalog add`) stay. A running `serve` switches to the new "
                     "index within seconds. Exit code 1 when some files were left out (each is listed with the "
                     "reason), 2 when nothing was built.")
    b.add_argument("--catalog", type=Path, required=True, metavar="FOLDER", help="the folder of photos")
    b.add_argument("--bundle", type=Path, default=None, metavar="BUNDLE", help=bundle)
    b.add_argument("--out", type=Path, default=None, metavar="FOLDER", help="where the index goes (default: index.path)")
    b.add_argument("--labels", type=Path, default=None, metavar="FILE",
                   help="labels other than the file names: CSV/TSV of id,label or JSON {id: label}")
    b.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="processes working in parallel (default: build.workers, one per core; 1 = no extra process)")
    b.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="work on Ray instead (pip install '.[scale]'): a local Ray without ADDRESS, else a cluster "
                        "(auto, HOST:6379, ray://HOST:10001); default: build.ray / build.ray_address")
    q = command(sub, "query", "say which catalog item is in each photo", parents=[common],
                more=" One line per photo: match or no match, with a confidence word (high, medium, low), then the "
                     "nearest items with their cosine and matching points. Exit 1 when a photo cannot be read.")
    q.add_argument("images", nargs="+", type=Path, metavar="PHOTO", help="photo files (JPEG, PNG, WebP, …)")
    q.add_argument("--index", type=Path, default=None, metavar="FOLDER", help="the index (default: index.path)")
    q.add_argument("--bundle", type=Path, default=None, metavar="BUNDLE", help=bundle)
    q.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                   help="nearest items shown per photo, ≥ 1 (default: index.top_k)")
    q.add_argument("--json", action="store_true", help="one JSON line per photo, for scripts")
    c = command(sub, "catalog", "add, remove, list, export or import items and their photos (while `serve` runs, too)")
    cs = c.add_subparsers(dest="catalog_cmd", required=True, metavar="COMMAND")
    a = command(cs, "add", "enrol photos as items (an id the catalog has already is refused unless --replace)",
                parents=[common])
    a.add_argument("images", nargs="+", type=Path, metavar="PHOTO", help="one photo per item")
    a.add_argument("--label", default=None, help="the name shown (default: the file name)")
    a.add_argument("--id", dest="item_id", default=None, help="the item's id (one photo only; default: from the file name)")
    a.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="an attribute returned with every match of the item (repeat for more: --attr sku=A-12)")
    a.add_argument("--replace", action="store_true", help="enrol an item the catalog has anew (its photos go)")
    ph = command(cs, "photos", "list an item's photos, add one, or remove one", parents=[common],
                 more=" A box has a front and a back: an item of several photos is matched by any of them.")
    ph.add_argument("item_id", metavar="ID", help="the item, as `catalog list` shows it")
    ph.add_argument("--add", type=Path, default=None, metavar="PHOTO", help="add this photo to the item")
    ph.add_argument("--name", default=None, help="the added photo's name (default: the next free number)")
    ph.add_argument("--remove", default=None, metavar="NAME", help="remove the photo of this name")
    r = command(cs, "remove", "remove items", parents=[common])
    r.add_argument("ids", nargs="+", metavar="ID", help="item ids, as `catalog list` shows them")
    command(cs, "list", "list the items: id, then label", parents=[common])
    e = command(cs, "export", "write the whole catalog (ids, labels, original photos) to one archive file",
                parents=[common], more=" A backup, or a catalog to move to another device (`catalog import`).")
    e.add_argument("archive", type=Path, metavar="FILE")
    im = command(cs, "import", "add the items of an archive made by `catalog export`", parents=[common],
                 more=" The archive is checked whole first, then committed at once: all of it or nothing.")
    im.add_argument("archive", type=Path, metavar="FILE")
    im.add_argument("--replace", action="store_true", help="overwrite items whose ids the catalog already has")
    return p


def _config(args) -> Config:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load_config(path)


def cmd_index_build(cfg: Config, args) -> int:
    from edge_retrieval.catalog.build_workers import report_text
    out = args.out or cfg.index.path
    _refuse_the_demos_index(cfg, out)
    encoder = wiring.load(cfg, args.bundle)
    previous = _describe_index(out)
    built = wiring.build_catalog(cfg, encoder, args.catalog, out, labels=args.labels, workers=args.workers,
                                 ray=args.ray, progress=sys.stderr.isatty())
    print(f"indexed {built.indexed} photos of {built.items} items from {args.catalog} into {out}: {report_text(built)}",
          file=sys.stderr)
    if Path(out).resolve() == Path(cfg.index.path).resolve():  # this device's index: the store's changes on top
        catalog = wiring.catalog_service(cfg, encoder)
        rep = catalog.apply()
        catalog.stop()
        print(f"catalog store: {len(rep.enrolled)} enrolled, {len(rep.removed)} removed on top (change {rep.seq})", file=sys.stderr)
    if previous:  # the index may be the one a running `serve` has loaded: it switches to it, never undoes it
        print(f"replaced {previous} in {out}; a running `serve` switches to it within a few seconds", file=sys.stderr)
    if built.skipped or built.ignored:  # built, but not everything in the folder became an item: say so in the code
        print(f"{len(built.skipped)} image files skipped and {len(built.ignored)} other files ignored (listed above); "
              "exit code 1", file=sys.stderr)
        return 1
    return 0


def _refuse_the_demos_index(cfg: Config, out: Path) -> None:
    """A config that runs the demo keeps the demo's index at index.path: building one's own photos into it would
    replace the demo's catalog for good. Say how to start a catalog of one's own instead."""
    if not cfg.catalog.demo or Path(out).resolve() != Path(cfg.index.path).resolve():
        return
    raise ConfigError(
        f"{cfg.source_file or 'the default config'} runs the demo (catalog.demo: true): `index build` into its index "
        f"({cfg.index.path}) would replace the demo's catalog. Give your catalog a config of its own, which keeps its "
        "index, catalog store and history beside it — e.g. ~/shop/config.yaml with `camera: {source: /dev/video0}` "
        "(README.md, \"Use your own catalog\") — then: edge-retrieval index build --config ~/shop/config.yaml "
        "--catalog ~/shop/catalog. (To build into it anyway, set catalog.demo: false; `make clean` resets the "
        "demo.)")


def _describe_index(path: Path) -> str | None:
    """'gen-000003 (14 items)' for the live generation at ``path``, None when there is none."""
    from edge_retrieval.index.reader import CatalogIndex, read_current_name
    name = read_current_name(path)
    if name is None:
        return None
    try:
        with CatalogIndex.load(path, expected_bundle_sha256=None) as idx:
            return f"{name} ({idx.item_count} items)"
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
            print(json.dumps({"query": str(path), "match": out["match"], "matches": out["matches"],
                              "results": out["results"], "timings_ms": out["timings_ms"]}), flush=True)
        else:
            m = result.match
            verdict = (f"match {_named(m)} · {confidence(m, m)} confidence" + (
                f" · {m.inliers} matching points" if m.inliers else "") if m else "no match")
            print(f"{path}  {verdict}  ({result.timings_ms['total']:.1f} ms)")
            for other in result.matches[1:]:  # the other items in the frame, best first
                print(f"  also {_named(other)} · {confidence(other, other)} confidence"
                      + (f" · {other.inliers} matching points" if other.inliers else ""))
            found = {x.id: x for x in result.matches or ([m] if m else [])}
            for rank, c in enumerate(result.results, 1):  # the same word as the page, the numbers behind it
                points = f", {c.inliers} points" if c.inliers is not None else ""
                print(f"  {rank}. {_named(c)}  {confidence(c, found.get(c.id))} (cosine {c.score:.3f}{points})")
    return 1 if failures else 0


def _named(c) -> str:
    """An item as a person reads it: its id, and its label when that says something more."""
    return c.id if c.label in (c.id, c.id.rsplit("/", 1)[-1]) else f"{c.id} ({c.label})"


def cmd_catalog(cfg: Config, args) -> int:
    from edge_retrieval.catalog.ids import id_from_path
    from edge_retrieval.imaging.codec import read_image
    catalog = wiring.catalog_service(cfg, wiring.load(cfg))
    holder = catalog.holder
    try:
        if args.catalog_cmd == "list":
            catalog.apply()  # the changes in the delta beside the generation are in the catalog too
            for it in holder.current().items:
                if item_of(it.id) == it.id:  # an item once, by its first photo
                    print(f"{it.id}\t{it.label}")
            return 0
        if args.catalog_cmd == "photos":
            catalog.apply()
            if args.add is not None:
                rgb = read_image(args.add, cfg.images.max_pixels)
                done = catalog.add_photo(rgb, args.item_id, args.name or None)
                _apply(catalog)
                print(f"added photo {done['photo']!r} to {args.item_id}", file=sys.stderr)
            if args.remove is not None:
                catalog.remove_photo(args.item_id, args.remove)
                _apply(catalog)
                print(f"removed photo {args.remove!r} of {args.item_id}", file=sys.stderr)
            for p in catalog.photos(args.item_id):
                print(p or "(first)")
            return 0
        if args.catalog_cmd == "export":
            from edge_retrieval.catalog.archive import export_catalog
            catalog.apply()  # the delta's items too
            rep = export_catalog(catalog.store, holder.current().items, args.archive)
            print(f"exported {rep.items} items ({rep.bytes / 2**20:.1f} MB of photos, store change {rep.store_seq}) "
                  f"to {args.archive}", file=sys.stderr)
            return 0
        if args.catalog_cmd == "import":  # committed to the store in one transaction, then indexed
            from edge_retrieval.catalog.archive import import_catalog
            catalog.apply()
            rep = import_catalog(catalog.store, args.archive, catalog.photo_keys, replace=args.replace,
                                 images=cfg.images, max_photos=cfg.catalog.max_photos_per_item)
            _apply(catalog)
            print(f"imported {rep.items} items from {args.archive}" + (f" ({len(rep.replaced)} replaced)" if rep.replaced
                  else "") + f"; index now has {holder.current().item_count} items", file=sys.stderr)
            return 0
        if args.catalog_cmd == "remove":  # the same path as DELETE /api/catalog: committed, then indexed
            missing = [i for i in args.ids if catalog.remove(i) is None]
            _apply(catalog)
            print(f"removed {len(args.ids) - len(missing)}; index now has {holder.current().item_count} items",
                  file=sys.stderr)
            if missing:
                raise CatalogIndexError(f"not in the catalog: {', '.join(missing)}")
            return 0
        if args.item_id and len(args.images) > 1:
            raise CatalogIndexError("--id names one item: give one image with it")
        ids = []
        for p in args.images:  # the same path as an HTTP enrolment: validated, committed, then indexed
            item_id = args.item_id or id_from_path(p.name)  # any file name, as `index build` derives it
            ids.append(catalog.enrol(read_image(p, cfg.images.max_pixels), item_id, args.label or p.stem,
                                     attributes=_attributes(args.attr), replace=args.replace)["id"])
        _apply(catalog)
        print(f"enrolled {', '.join(ids)}; index now has {holder.current().item_count} items", file=sys.stderr)
        return 0
    finally:
        catalog.stop()


def _attributes(pairs: list[str]) -> dict[str, str]:
    """``--attr KEY=VALUE`` options as attributes; InputError for one without '='."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise InputError(f"--attr {bad[0]!r}: write it KEY=VALUE, e.g. --attr sku=A-12")
    return dict(p.split("=", 1) for p in pairs)


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
             appliance.catalog.holder.current().item_count, cfg.index.path, redact(cfg.camera.source), w.host, w.port,
             "enabled" if w.api_token else "disabled (no web.api_token)")
    log.info("open the page: %s", "  ".join(page_urls(w.host, w.port)))
    if appliance.catalog.holder.current().item_count == 0:
        where = f"--config {cfg.source_file} " if cfg.source_file else ""
        log.warning("the catalog is empty: nothing can be recognised yet. Add items on the page (Catalog → Enrol "
                    "photo, or what the camera sees; needs web.api_token), or here: `edge-retrieval catalog add "
                    "%sPHOTO... --label LABEL`, or index a folder of photos, one per item: `edge-retrieval index "
                    "build %s--catalog FOLDER` (a running serve picks either up within seconds)", where, where)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    notify_systemd(lambda: watchdog_check(appliance, http_probe(w.host, w.port)))
    try:
        serve(create_app(w, appliance), w)
    except KeyboardInterrupt:
        pass
    finally:
        appliance.stop()  # MQTT says "offline" on a clean stop
    return 0


def cmd_init(args) -> int:
    from edge_retrieval.app.first_run import write_starter
    config = write_starter(args.folder, args.camera)
    folder = config.parent
    print(f"wrote {config} (camera {args.camera}; the page's API token is in it) and {folder / 'catalog'}/\n"
          f"next: put one photo per item in {folder / 'catalog'}/ (the file name is its id and label), then\n"
          f"  edge-retrieval serve --config {config}")
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
        if args.cmd == "init":
            return cmd_init(args)
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
