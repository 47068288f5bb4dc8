"""The LAN web page and JSON API of the appliance: routes only, no model code.

Everything the routes need comes in through a :class:`Services` object that ``device/__main__.py``
wires from the camera loop, the lookup function, the index and the catalog store. This module never
imports the encoder or the index, so the HTTP layer is tested with a fake (``tests/test_web.py``) and
an upload goes through exactly the same lookup function as a camera frame.

Served by waitress (:func:`serve`), never the Flask development server. All errors are JSON
``{"error": "..."}``.
"""
from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol

import flask
from werkzeug.exceptions import HTTPException

from device.errors import ApplianceError, ImageError
from device.results import LookupResult

log = logging.getLogger(__name__)

# Each open MJPEG stream holds one waitress worker thread for as long as the viewer watches. With the
# minimum of 4 threads, at most 2 streams are allowed so 2 threads stay free for the API and the
# page's polling; serve() raises the stream limit when given more threads.
MIN_THREADS = 4
_THREADS_KEPT_FOR_API = 2

# Label name used for a labelled metric whose dict keys are plain values ("camera" rather than
# "source=camera"). Metrics not listed here get the label name "key".
METRIC_LABEL_NAMES = {
    "lookups_total": "source",
    "errors_total": "kind",
    "camera_restarts_total": "reason",
}

_STREAM_KEEPALIVE_S = 2.0  # with a stalled camera the last frame is re-sent this often (see _mjpeg)
_FIRST_FRAME_WAIT_S = 1.0  # how long /stream.mjpg waits for a first frame before answering 503
_CATALOG_PAGE_DEFAULT = 100
_CATALOG_PAGE_MAX = 1000


@dataclass(frozen=True)
class WebSettings:
    """The ``web:`` section of config.yaml (built by the config module)."""

    host: str = "0.0.0.0"
    port: int = 8080
    max_upload_mb: float = 10.0  # larger POST bodies are refused with 413
    api_token: str | None = None  # bearer token for catalog changes; None disables them (403)
    stream_fps: float = 5.0  # upper bound of frames per second sent to each live-view viewer


class Services(Protocol):
    """Everything the web app calls; ``device/__main__.py`` provides the real implementation.

    Methods may be called from several waitress threads at once, so implementations must be
    thread-safe. Any :class:`ApplianceError` other than :class:`ImageError` becomes HTTP 503 with its
    message; any other exception becomes HTTP 500 (logged).
    """

    def query_image(self, data: bytes, source: str) -> LookupResult:
        """Decode the image bytes, encode and search: the one shared lookup function.

        ``source`` is ``"upload"`` for ``POST /api/query``. Raises :class:`ImageError` for an image
        that cannot be decoded or is too large; the error may carry an ``http_status`` attribute (413
        too many pixels, 415 unsupported format), else the answer is 400.
        """
        ...

    def latest_result(self) -> LookupResult | None:
        """The latest lookup (camera trigger or upload), or None before the first one."""
        ...

    def latest_frame_jpeg(self) -> tuple[int, bytes] | None:
        """``(frame index, JPEG bytes)`` of the live view, or None when there is no camera/frame."""
        ...

    def wait_frame_jpeg(self, after_index: int, timeout_s: float) -> tuple[int, bytes] | None:
        """Block until a frame newer than ``after_index`` exists and return the newest one;
        None after ``timeout_s`` without one."""
        ...

    def request_lookup(self) -> None:
        """Ask the camera loop to look up the next frame now (the page's "Look up now" button)."""
        ...

    def health(self) -> dict:
        """Status for ``GET /api/health``. Must contain ``"ok": bool`` (HTTP 200 if true, else 503).

        The page reads, when present: ``camera: {"state": str, ...}`` (``state`` e.g. "running",
        "stalled", "absent"), ``bundle: {"name": str, "quantization": str}``,
        ``index: {"size": int, "generation": int}``, ``uptime_s: float``.
        """
        ...

    def metrics(self) -> dict[str, float | dict[str, float]]:
        """Counters and gauges without the ``appliance_`` prefix. Names ending in ``_total`` are
        counters, the rest gauges. A dict value is a labelled metric: ``{"camera": 3}`` gives
        ``{source="camera"}`` for ``lookups_total`` (see METRIC_LABEL_NAMES); keys written
        ``"name=value"`` choose the label name themselves."""
        ...

    def enrol(self, data: bytes, label: str, item_id: str | None) -> dict:
        """Add (or replace) a catalog item from image bytes; ``item_id`` None lets the catalog choose.

        Returns ``{"id": str, "label": str, "status": "queued" | "done"}``. Raises ImageError on a
        bad image.
        """
        ...

    def remove(self, item_id: str) -> bool:
        """Remove a catalog item; False if the id is unknown."""
        ...

    def thumbnail(self, item_id: str) -> bytes | None:
        """The catalog item's thumbnail as JPEG bytes, or None if unknown."""
        ...

    def catalog_items(self) -> list[dict]:
        """All catalog items as ``[{"id": str, "label": str}, ...]`` in a stable order."""
        ...


def _error(status: int, message: str, **headers: str) -> flask.Response:
    response = flask.jsonify(error=message)
    response.status_code = status
    response.headers.update(headers)
    return response


def _result_json(result: LookupResult | None) -> dict:
    """A LookupResult as JSON with a ``thumbnail_url`` for each candidate (and the match, if any).

    Before the first lookup: ``{"results": [], "timings_ms": {}, "source": null, "timestamp": null}``
    so the page needs no special case.
    """
    if result is None:
        return {"results": [], "timings_ms": {}, "source": None, "timestamp": None}
    body = result.to_json()
    candidates = list(body.get("results", []))
    match = body.get("match")
    if isinstance(match, dict):
        candidates.append(match)
    for candidate in candidates:
        if "id" in candidate:
            candidate["thumbnail_url"] = flask.url_for(
                "catalog_thumbnail", item_id=str(candidate["id"])
            )
    return body


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _metric_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_:" else "_" for c in name)
    return "appliance_" + cleaned


def _label_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(
    values: Mapping[str, float | Mapping[str, float]],
    http_requests: Mapping[tuple[str, str, str], int],
) -> str:
    """Prometheus text exposition (format 0.0.4) of the services' metrics plus the HTTP counters
    ``appliance_http_requests_total{method,route,status}``."""
    lines: list[str] = []
    for raw_name in sorted(values):
        value = values[raw_name]
        name = _metric_name(raw_name)
        lines.append(f"# TYPE {name} {'counter' if raw_name.endswith('_total') else 'gauge'}")
        if isinstance(value, Mapping):
            default_label = METRIC_LABEL_NAMES.get(raw_name, "key")
            for key in sorted(value, key=str):
                label, sep, label_value = str(key).partition("=")
                if not sep:
                    label, label_value = default_label, str(key)
                lines.append(
                    f'{name}{{{label}="{_label_value(label_value)}"}} {_format_value(value[key])}'
                )
        else:
            lines.append(f"{name} {_format_value(value)}")
    lines.append("# TYPE appliance_http_requests_total counter")
    for (method, route, status), count in sorted(http_requests.items()):
        lines.append(
            f'appliance_http_requests_total{{method="{_label_value(method)}",'
            f'route="{_label_value(route)}",status="{status}"}} {count}'
        )
    return "\n".join(lines) + "\n"


def _mjpeg(first: tuple[int, bytes], services: Services, interval_s: float) -> Iterator[bytes]:
    """multipart/x-mixed-replace parts, at most one per ``interval_s``.

    When no new frame arrives within the keep-alive time the last frame is sent again: writing is the
    only way waitress notices that a viewer has gone, and a never-writing stream would keep a worker
    thread forever. When the client disconnects, waitress closes this generator (GeneratorExit).
    """
    index, jpeg = first
    while True:
        sent_at = time.monotonic()
        yield (
            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
            + str(len(jpeg)).encode()
            + b"\r\n\r\n"
            + jpeg
            + b"\r\n"
        )
        remaining_s = interval_s - (time.monotonic() - sent_at)
        if remaining_s > 0:
            time.sleep(remaining_s)
        newer = services.wait_frame_jpeg(index, _STREAM_KEEPALIVE_S)
        if newer is not None:
            index, jpeg = newer


def create_app(web: WebSettings, services: Services) -> flask.Flask:
    """The Flask app of the appliance: the page, the MJPEG live view and the JSON API."""
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(web.max_upload_mb * 1024 * 1024)
    app.config["MAX_STREAMS"] = MIN_THREADS - _THREADS_KEPT_FOR_API  # serve() raises it with threads
    app.json.sort_keys = False  # keep the LookupResult key order readable

    http_requests: Counter[tuple[str, str, str]] = Counter()
    http_lock = threading.Lock()
    streams = {"open": 0}
    streams_lock = threading.Lock()
    stream_interval_s = 1.0 / max(web.stream_fps, 0.1)

    # --- errors: every one is JSON -------------------------------------------------------------

    @app.errorhandler(413)
    def too_large(_exc: HTTPException) -> flask.Response:
        return _error(413, f"upload larger than {web.max_upload_mb:g} MB (web.max_upload_mb)")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> flask.Response | HTTPException:
        if exc.code is None or exc.code < 400:
            return exc
        response = _error(exc.code, exc.description or exc.name)
        # keep Allow on 405 and similar headers werkzeug adds
        for key, value in exc.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(ImageError)
    def image_error(exc: ImageError) -> flask.Response:
        status = getattr(exc, "http_status", 400)
        return _error(status if status in (400, 413, 415) else 400, str(exc))

    @app.errorhandler(ApplianceError)
    def appliance_error(exc: ApplianceError) -> flask.Response:
        log.warning("%s: %s", type(exc).__name__, exc)
        return _error(503, str(exc))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> flask.Response:
        log.exception("unexpected error in %s %s", flask.request.method, flask.request.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the appliance log")

    @app.after_request
    def count_request(response: flask.Response) -> flask.Response:
        # the rule, not the path, so scanners probing random URLs cannot grow the metric set
        rule = flask.request.url_rule
        key = (flask.request.method, rule.rule if rule else "unmatched", str(response.status_code))
        with http_lock:
            http_requests[key] += 1
        return response

    def require_token() -> flask.Response | None:
        if web.api_token is None:
            return _error(403, "catalog changes are disabled: set web.api_token in config.yaml")
        scheme, _, given = flask.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), web.api_token.encode()
        ):
            return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        return None

    def uploaded_image() -> bytes:
        upload = flask.request.files.get("image")
        if upload is None:
            flask.abort(400, "missing multipart field 'image'")
        return upload.read()

    # --- page and live view ----------------------------------------------------------------------

    @app.get("/")
    def index() -> str:
        return flask.render_template("index.html", stream_fps=web.stream_fps)

    @app.get("/stream.mjpg")
    def stream() -> flask.Response:
        first = services.latest_frame_jpeg() or services.wait_frame_jpeg(-1, _FIRST_FRAME_WAIT_S)
        if first is None:
            return _error(503, "no camera frame available")
        with streams_lock:
            if streams["open"] >= app.config["MAX_STREAMS"]:
                return _error(
                    503, f"too many live viewers ({streams['open']}); use /api/frame.jpg"
                )
            streams["open"] += 1
        released = threading.Event()

        def release() -> None:
            # close() may be called more than once; count the stream out exactly once
            if not released.is_set():
                released.set()
                with streams_lock:
                    streams["open"] -= 1

        response = flask.Response(
            _mjpeg(first, services, stream_interval_s),
            mimetype="multipart/x-mixed-replace; boundary=frame",
        )
        response.headers["Cache-Control"] = "no-store"
        response.call_on_close(release)
        return response

    @app.get("/api/frame.jpg")
    def frame() -> flask.Response:
        latest = services.latest_frame_jpeg()
        if latest is None:
            return _error(404, "no camera frame available")
        response = flask.Response(latest[1], mimetype="image/jpeg")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Index"] = str(latest[0])
        return response

    # --- status ----------------------------------------------------------------------------------

    @app.get("/api/health")
    def health() -> flask.Response:
        status = services.health()
        response = flask.jsonify(status)
        response.status_code = 200 if status.get("ok") is True else 503
        return response

    @app.get("/metrics")
    def metrics() -> flask.Response:
        with http_lock:
            counts = dict(http_requests)
        with streams_lock:
            open_streams = streams["open"]
        # each open live view holds a waitress thread: worth watching
        values = {**services.metrics(), "http_streams_open": open_streams}
        text = render_metrics(values, counts)
        return flask.Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    # --- lookups ---------------------------------------------------------------------------------

    @app.get("/api/results/latest")
    def latest() -> flask.Response:
        response = flask.jsonify(_result_json(services.latest_result()))
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.post("/api/query")
    def query() -> flask.Response:
        data = uploaded_image()
        return flask.jsonify(_result_json(services.query_image(data, "upload")))

    @app.post("/api/lookup")
    def lookup_now() -> tuple[flask.Response, int]:
        services.request_lookup()
        return flask.jsonify(status="requested"), 202

    # --- catalog ---------------------------------------------------------------------------------

    @app.get("/api/catalog")
    def catalog_list() -> flask.Response:
        try:
            offset = max(int(flask.request.args.get("offset", 0)), 0)
            limit = min(max(int(flask.request.args.get("limit", _CATALOG_PAGE_DEFAULT)), 0),
                        _CATALOG_PAGE_MAX)
        except ValueError:
            return _error(400, "offset and limit must be integers")
        items = services.catalog_items()
        return flask.jsonify(
            items=items[offset:offset + limit], total=len(items), offset=offset, limit=limit
        )

    @app.post("/api/catalog")
    def catalog_add() -> tuple[flask.Response, int] | flask.Response:
        denied = require_token()
        if denied is not None:
            return denied
        data = uploaded_image()
        label = flask.request.form.get("label", "").strip()
        if not label:
            return _error(400, "missing form field 'label'")
        item_id = flask.request.form.get("id", "").strip() or None
        outcome = services.enrol(data, label, item_id)
        return flask.jsonify(outcome), 201 if outcome.get("status") == "done" else 202

    @app.delete("/api/catalog/<path:item_id>")
    def catalog_remove(item_id: str) -> flask.Response:
        denied = require_token()
        if denied is not None:
            return denied
        if not services.remove(item_id):
            return _error(404, f"unknown catalog item {item_id!r}")
        return flask.jsonify(id=item_id, status="removed")

    @app.get("/api/catalog/<path:item_id>/thumb.jpg")
    def catalog_thumbnail(item_id: str) -> flask.Response:
        jpeg = services.thumbnail(item_id)
        if jpeg is None:
            return _error(404, f"no thumbnail for catalog item {item_id!r}")
        response = flask.Response(jpeg, mimetype="image/jpeg")
        response.headers["Cache-Control"] = "max-age=60"  # an item can be re-enrolled under its id
        return response

    return app


def serve(app: flask.Flask, web: WebSettings, threads: int = MIN_THREADS) -> None:
    """Serve ``app`` with waitress on ``web.host:web.port`` until interrupted.

    Every open live view (/stream.mjpg) holds one worker thread, so ``threads`` is raised to at least
    MIN_THREADS and streams are capped at ``threads - 2``: two threads always stay free for the API.
    """
    import waitress

    threads = max(threads, MIN_THREADS)
    app.config["MAX_STREAMS"] = threads - _THREADS_KEPT_FOR_API
    log.info("web: http://%s:%d (%d threads, up to %d live viewers)",
             web.host, web.port, threads, app.config["MAX_STREAMS"])
    waitress.serve(app, host=web.host, port=web.port, threads=threads)
