"""The one public place that builds the appliance's parts from a ``Config``: ``serve`` and the CLI
(edge_retrieval/cli.py), the benches and the tests all wire them here, so no magic number is written twice.

Each builder takes the whole ``Config`` (every part reads its own section) and, where a part needs the model,
the loaded ``Encoder`` (loading one costs a second; tests share one):

  encoder = load(cfg)                          # the bundle, with its fallback (edge_retrieval/model/encoder.py)
  app = build_appliance(cfg, encoder).start()  # camera loop, recorder, catalog service, lookup
  lookup = build_lookup(cfg, encoder, open_index(cfg, encoder))
  build_catalog(cfg, encoder, folder, out)     # `index build`
"""
from __future__ import annotations

import logging
from pathlib import Path

from edge_retrieval.app.appliance import Appliance
from edge_retrieval.app.camera_loop import CameraLoop
from edge_retrieval.capture.camera import Camera
from edge_retrieval.capture.trigger import Trigger
from edge_retrieval.catalog.build import BuildReport, ItemMaker, build_index
from edge_retrieval.catalog.build_workers import runner_for
from edge_retrieval.catalog.ids import load_labels_file
from edge_retrieval.catalog.service import CatalogService
from edge_retrieval.core.config import Config
from edge_retrieval.core.config_file import resolve_bundle
from edge_retrieval.core.errors import ApplianceError, CatalogIndexError
from edge_retrieval.index.delta import single_threaded_blas
from edge_retrieval.index.holder import IndexHolder
from edge_retrieval.index.reader import CatalogIndex, index_exists
from edge_retrieval.model.encoder import Encoder, load_encoder
from edge_retrieval.outputs.history import History
from edge_retrieval.outputs.metrics import Metrics
from edge_retrieval.outputs.push import PushHub
from edge_retrieval.outputs.recorder import Recorder
from edge_retrieval.search.lookup import IndexSource, Lookup

log = logging.getLogger(__name__)


def load(cfg: Config, bundle: Path | None = None) -> Encoder:
    """The encoder of ``encoder.bundle`` (falling back to ``encoder.fallback_bundle`` when its model package is
    missing); a ``bundle`` named on the command line instead, with no fallback."""
    if bundle is None:
        return load_encoder(cfg.encoder)
    bundle = resolve_bundle(Path(bundle), Path.cwd())  # a name or a path, as in config.yaml
    return load_encoder(cfg.encoder.model_copy(update={"bundle": bundle, "fallback_bundle": None}))


def open_index(cfg: Config, encoder: Encoder, path: Path | None = None, *, create_empty: bool = False) -> IndexHolder:
    """The live index at ``index.path`` (or ``path``) for ``encoder``'s bundle; ``create_empty``: an empty
    generation when there is none yet, and damaged ones set aside (what a starting appliance does)."""
    index = cfg.index if path is None else cfg.index.model_copy(update={"path": path})
    return IndexHolder(index, expected_bundle_sha256=encoder.sha256, create_empty=create_empty, dim=encoder.dim,
                       require_features=cfg.recognition.require_features, recover=create_empty)


def item_maker(cfg: Config, encoder: Encoder) -> ItemMaker:
    """What turns one catalog image into an item (descriptors, features, thumbnail)."""
    return ItemMaker(encoder, cfg.recognition, cfg.index.thumbnail_px)


def build_lookup(cfg: Config, encoder: Encoder, index: IndexSource, *, top_k: int | None = None) -> Lookup:
    """The lookup over ``index`` (a holder or a loaded generation); ``top_k`` overrides ``index.top_k``."""
    return Lookup(encoder, index, cfg.recognition, top_k=top_k or cfg.index.top_k, images=cfg.images)


def catalog_service(cfg: Config, encoder: Encoder, *, set_aside: list[dict] | None = None) -> CatalogService:
    """The catalog service (store + live index + item maker) that HTTP and the CLI both change the catalog
    through; not started."""
    return CatalogService(cfg.catalog, open_index(cfg, encoder, create_empty=True), item_maker(cfg, encoder),
                          images=cfg.images, set_aside=set_aside)


def build_catalog(cfg: Config, encoder: Encoder, folder: Path, out: Path | None = None, *,
                  labels: Path | None = None, allow_empty: bool = False, workers: int | None = None,
                  ray: str | None = None, progress: bool = False) -> BuildReport:
    """``index build``: index every image of ``folder`` into ``out`` (default ``index.path``) with labels from
    ``labels`` (default ``catalog.labels``), on ``build.workers`` processes or Ray (``build:``)."""
    maker = item_maker(cfg, encoder)
    names, attributes = load_labels_file(labels or cfg.catalog.labels)
    return build_index(folder, maker, out or cfg.index.path, n_trees=cfg.index.n_trees, labels=names,
                       attributes=attributes, max_photos=cfg.catalog.max_photos_per_item, images=cfg.images,
                       progress=progress, allow_empty=allow_empty,
                       runner=runner_for(cfg.build, maker, workers=workers, ray=ray))


def event_sinks(cfg: Config) -> list:
    """The MQTT publisher and the webhook notifier that the config enables, started. Home Assistant's device
    links to the page at this machine's LAN address (``mqtt.page_url`` overrides it)."""
    from edge_retrieval.app.systemd import page_urls
    from edge_retrieval.outputs.mqtt import MqttPublisher
    from edge_retrieval.outputs.webhook import WebhookNotifier  # paho is imported only when MQTT is used
    sinks: list = []
    if cfg.mqtt.enabled:
        sinks.append(MqttPublisher(cfg.mqtt, page_url=page_urls(cfg.web.host, cfg.web.port)[-1]).start())
    if cfg.webhook.enabled:
        sinks.append(WebhookNotifier(cfg.webhook, cfg.mqtt.device_id).start())
    return sinks


def build_appliance(cfg: Config, encoder: Encoder, *, set_aside: list[dict] | None = None) -> Appliance:
    """The running parts of ``serve``, not started: the catalog service over ``index.path``, the shared lookup,
    the recorder (history, metrics, the enabled MQTT/webhook sinks, the page's event hub) and, unless
    ``camera.source`` is ``none``, the camera loop with its trigger; the Home Assistant "look up now" button
    asks the camera loop for a lookup. ``Appliance.stop()`` stops them all."""
    single_threaded_blas()
    catalog = catalog_service(cfg, encoder, set_aside=set_aside)
    lookup = build_lookup(cfg, encoder, catalog.holder)
    sinks = event_sinks(cfg)
    recorder = Recorder(Metrics(), PushHub(cfg.sse), history=History(cfg.history), sinks=sinks,
                        history_config=cfg.history, mqtt=cfg.mqtt)
    camera_loop = None
    if cfg.camera.source != "none":
        camera_loop = CameraLoop(Camera(cfg.camera, cfg.images), Trigger(cfg.trigger) if cfg.trigger.enabled else None,
                                 lookup, recorder, web=cfg.web)
    app = Appliance(lookup=lookup, catalog=catalog, recorder=recorder, camera_loop=camera_loop, web=cfg.web)
    for sink in sinks:  # the Home Assistant "look up now" button
        if hasattr(sink, "on_lookup_command"):
            sink.on_lookup_command(app.request_lookup)
    return app


def prepare_catalog(cfg: Config, encoder: Encoder) -> Config:
    """What ``serve`` does before it builds the appliance: materialise the demo (``catalog.demo``) and build the
    index from ``catalog.build_from`` when there is none yet (or one of another bundle). Returns the config the
    demo completes (its catalog, camera and a token valid until restart)."""
    if cfg.catalog.demo:
        from edge_retrieval.app.demo import materialise_demo
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
                             "(/dev/video0, csi://0, rtsp://…), 'none' for uploads only, or enable the demo")
    if cfg.catalog.build_from and needs_build(cfg.index.path, encoder):
        log.info("building the index at %s from %s", cfg.index.path, cfg.catalog.build_from)
        build_catalog(cfg, encoder, cfg.catalog.build_from, allow_empty=True)
        # the items enrolled at run time come back, and removed ones stay out: serve replays the store next
    return cfg


def needs_build(path: Path, encoder: Encoder) -> bool:
    """No index yet, an empty one, or one made with another bundle / unreadable: (re)build it from the catalog
    folder (items enrolled or removed since are replayed from the store on top)."""
    if not index_exists(path):
        return True
    try:
        with CatalogIndex.load(path, expected_bundle_sha256=None) as idx:
            if idx.bundle_sha256 == encoder.sha256:
                if idx.size == 0:  # e.g. the first start found catalog.build_from empty: photos may be there now
                    log.info("index %s is empty: building it from catalog.build_from", path)
                return idx.size == 0
            log.warning("index %s was built with another bundle (%s…): rebuilding it", path, idx.bundle_sha256[:12])
    except CatalogIndexError as e:
        log.warning("index %s is unusable (%s): rebuilding it", path, e)
    return True
