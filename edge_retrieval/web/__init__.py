"""The LAN web page and JSON API of the appliance: routes only, no model code.

``create_app(config, appliance)`` registers four blueprints — the page (``page.py``), the live view
(``stream.py``), the event stream (``sse.py``) and the JSON API (``api.py``) — and keeps the appliance in
``app.extensions["appliance"]``.
What the routes call is written once, in ``services.Services``: ``edge_retrieval.app.appliance.Appliance`` satisfies it, and
tests/test_web.py drives the routes with a fake that does too (and tests/test_service.py with a real appliance).

Served by waitress (:func:`serve`), never the Flask development server. Every error is JSON
``{"error": "..."}``: InputError → 400 (or its 404/409/413/415), BusyError → 503 + Retry-After, DiskFullError →
507, other ApplianceError → 503, anything else → 500 (logged); what the parsers refuse is never a 500 (a number
in a URL past what the store holds → 404, JSON nested too deeply → 400). A request whose ``Host`` is not one of the
device's names (``web.allowed_hosts``: DNS rebinding) gets 421 before any route runs; every answer carries
nosniff / CSP / frame-deny headers, and a POST or DELETE from another site's page (its ``Origin``) gets 403.
"""
from __future__ import annotations

import logging

import flask
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from edge_retrieval.core.config import WebConfig
from edge_retrieval.core.errors import ApplianceError, BusyError, DiskFullError, InputError
from edge_retrieval.web import api, page, sse, stream
from edge_retrieval.web.common import THREADS_KEPT_FOR_API, StreamSlots, error
from edge_retrieval.web.hosts import allowed_hosts, host_checker
from edge_retrieval.web.services import Services

log = logging.getLogger(__name__)


# Labels and ids are short; a text form field over this is refused with 413 (werkzeug's default, named in the
# message). The multipart parser may also buffer this much of a file part, so it must not be set much lower.
MAX_FORM_FIELD_BYTES = 500 * 1024
# The forms have at most three parts (image, label, id); a body of thousands is an attack, refused with 413.
MAX_FORM_PARTS = 100
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Everything the page needs comes from the device itself; no inline script, no framing, no plugins.
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    "Referrer-Policy": "no-referrer",
}


class _StoredInteger(IntegerConverter):
    """Every ``<int:...>`` in a route: a number past what SQLite stores (a signed 64-bit integer) names nothing,
    so it is 404 like any other unknown number, not an OverflowError (500) in the store."""

    def __init__(self, url_map, fixed_digits: int = 0, min: int | None = None,
                 max: int = 2**63 - 1, signed: bool = False) -> None:
        super().__init__(url_map, fixed_digits, min, max, signed)


class _JSONProvider(DefaultJSONProvider):
    """Flask's JSON, with a body nested too deep for the parser (RecursionError) refused like any other broken
    JSON: ``get_json`` answers 400 (or None with ``silent=True``), never 500."""

    def loads(self, s, **kwargs):
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _register_errors(app: flask.Flask, config: WebConfig) -> None:
    @app.errorhandler(413)
    def too_large(_exc: HTTPException) -> flask.Response:
        length = flask.request.content_length
        if length is None or length > app.config["MAX_CONTENT_LENGTH"]:
            return error(413, f"upload larger than {config.max_upload_mb:g} MB (web.max_upload_mb)")
        if length <= MAX_FORM_FIELD_BYTES:  # no field can be that large: too many parts
            return error(413, f"too many form parts (at most {MAX_FORM_PARTS}; the forms have 'image', 'label' "
                              "and 'id')")
        return error(413, f"a form field is larger than {MAX_FORM_FIELD_BYTES // 1024} KB, or the form has more "
                          f"than {MAX_FORM_PARTS} parts (labels are at most 200 characters; send the image as "
                          "the multipart file field 'image')")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> flask.Response | HTTPException:
        if exc.code is None or exc.code < 400:
            return exc
        response = error(exc.code, exc.description or exc.name)
        for key, value in exc.get_headers():  # keep Allow on 405 and similar headers werkzeug adds
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(InputError)
    def input_error(exc: InputError) -> flask.Response:
        return error(exc.http_status if exc.http_status in (400, 404, 409, 413, 415) else 400, str(exc))

    @app.errorhandler(BusyError)
    def busy(exc: BusyError) -> flask.Response:
        return error(503, str(exc), **{"Retry-After": str(exc.retry_after_s)})

    @app.errorhandler(DiskFullError)
    def disk_full(exc: DiskFullError) -> flask.Response:
        log.error("refused (disk full): %s", exc)
        return error(507, str(exc))

    @app.errorhandler(ApplianceError)
    def appliance_error(exc: ApplianceError) -> flask.Response:
        log.warning("%s: %s", type(exc).__name__, exc)
        return error(503, str(exc))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> flask.Response:
        log.exception("unexpected error in %s %s", flask.request.method, flask.request.path)
        return error(500, f"internal error ({type(exc).__name__}); see the appliance log")


def _same_origin() -> flask.Response | None:
    """Refuse a state-changing request that a browser sends on behalf of another site (a form post from a
    page elsewhere could drive the device or feed it bombs). Tools without an Origin header (curl, scripts,
    Home Assistant) are not browsers and pass."""
    if flask.request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    origin = flask.request.headers.get("Origin")
    if origin is None:
        if flask.request.headers.get("Sec-Fetch-Site") == "cross-site":
            return error(403, "cross-site request refused")
        return None
    if origin != flask.request.host_url.rstrip("/"):
        return error(403, f"cross-origin request from {origin} refused; use the device's own page or an API "
                          "client without an Origin header")
    return None


def create_app(config: WebConfig, appliance: Services) -> flask.Flask:
    """The Flask app of the appliance: the page, the MJPEG live view and the JSON API."""
    app = flask.Flask(__name__)
    app.json = _JSONProvider(app)
    app.url_map.converters["int"] = _StoredInteger  # before the blueprints add their rules
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_upload_mb * 1024 * 1024)
    app.config["MAX_STREAMS"] = config.threads - THREADS_KEPT_FOR_API
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_FORM_FIELD_BYTES
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    app.json.sort_keys = False  # keep the LookupResult key order readable
    app.extensions["appliance"] = appliance
    app.extensions["web_config"] = config
    app.extensions["stream_slots"] = StreamSlots()
    _register_errors(app, config)

    app.before_request(host_checker(allowed_hosts(config)))  # first: nothing runs for a foreign Host
    app.before_request(_same_origin)

    @app.after_request
    def count_request(response: flask.Response) -> flask.Response:
        response.headers.update({k: v for k, v in _SECURITY_HEADERS.items() if k not in response.headers})
        # the rule, not the path, so scanners probing random URLs cannot grow the metric set
        rule = flask.request.url_rule
        appliance.metrics.http_requests.labels(
            flask.request.method, rule.rule if rule else "unmatched", str(response.status_code)).inc()
        return response

    app.register_blueprint(page.bp)
    app.register_blueprint(stream.bp)
    app.register_blueprint(sse.bp)
    app.register_blueprint(api.bp)
    return app


# waitress keeps reading a connection while its request runs, so it sees a page that closed its event stream
# (environ["waitress.client_disconnected"]) and the stream's thread is freed within a second, not at its next write.
WAITRESS_LOOKAHEAD = {"channel_request_lookahead": 1}
# waitress refuses a body past max_request_body_size (413) before reading it; left at its 1 GB default it would
# spool a huge body to disk before any route runs. Set just above web.max_upload_mb, so that Flask, which counts
# the whole body (multipart headers included), answers its JSON 413 for anything in between.
BODY_MARGIN_BYTES = 1024 * 1024


def serve(app: flask.Flask, config: WebConfig) -> None:
    """Serve ``app`` with waitress on ``config.host:config.port`` with ``config.threads`` workers until
    interrupted; live views and event streams together are capped at ``threads - 2`` so two threads stay free
    for the API, idle connections are closed after ``channel_timeout_s`` (``connection_limit`` caps how many are open), and a body
    past ``max_upload_mb`` (+ ``BODY_MARGIN_BYTES``) is refused unread; a client that stops reading, trickles its
    request or opens too many connections is cut off (edge_retrieval/web/connections.py)."""
    from edge_retrieval.web.connections import create_server

    log.info("web: listening on %s:%d (%d threads, up to %d live views and event streams)",
             config.host, config.port, config.threads, app.config["MAX_STREAMS"])
    server = create_server(app, config, max_request_body_size=int(config.max_upload_mb * 1024 * 1024)
                           + BODY_MARGIN_BYTES, **WAITRESS_LOOKAHEAD)
    server.run()
