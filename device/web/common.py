"""What the web blueprints share: JSON errors, the app's appliance and ``web:`` config, the slots of long-lived
answers, and a lookup's JSON with the page's URLs."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

import flask

from device.config import WebConfig
from device.history import Entry, decision

if TYPE_CHECKING:  # the web layer never imports model code at run time
    from device.appliance import Appliance
    from device.results import LookupResult

# Each open MJPEG stream or event stream holds one waitress worker thread for as long as it is open; together
# they take at most threads - 2, so two threads always stay free for the API (config.web.threads is at least 4).
THREADS_KEPT_FOR_API = 2
_slots_lock = threading.Lock()


def error(status: int, message: str, **headers: str) -> flask.Response:
    """A JSON error response ``{"error": message}``."""
    response = flask.jsonify(error=message)
    response.status_code = status
    response.headers.update(headers)
    return response


def appliance() -> "Appliance":
    """The appliance of the current app."""
    return flask.current_app.extensions["appliance"]


def web_config() -> WebConfig:
    """The ``web:`` section of the current app."""
    return flask.current_app.extensions["web_config"]


def take_stream_slot(gauge) -> Callable[[], None] | None:
    """One of the app's ``MAX_STREAMS`` slots for a long-lived answer (live views and event streams share them),
    counted on ``gauge`` (a metrics gauge of open streams); returns its release (safe to call more than once),
    or None when every slot is taken."""
    metrics = appliance().metrics
    with _slots_lock:
        open_now = metrics.value("appliance_http_streams_open") + metrics.value("appliance_http_event_streams_open")
        if open_now >= flask.current_app.config["MAX_STREAMS"]:
            return None
        gauge.inc()
    released = threading.Event()

    def release() -> None:
        with _slots_lock:  # close() may be called more than once: count the stream out exactly once
            if not released.is_set():
                released.set()
                gauge.dec()
    return release


def with_thumbnails(body: dict) -> dict:
    """``body`` (a LookupResult's JSON) with a ``thumbnail_url`` on each candidate and on the match."""
    candidates = list(body["results"]) + ([body["match"]] if body.get("match") else [])
    for candidate in candidates:
        candidate["thumbnail_url"] = flask.url_for("api.catalog_thumbnail", item_id=str(candidate["id"]))
    return body


def entry_json(entry: Entry | LookupResult) -> dict:
    """A history entry as ``GET /api/history`` lists it (``n``, ``decision``, ``image_url``, thumbnails); a bare
    LookupResult (an appliance without a history) the same way, with ``n`` and ``image_url`` null."""
    if isinstance(entry, Entry):
        body = with_thumbnails(entry.to_json())
        body["image_url"] = flask.url_for("api.history_image", n=entry.n) if entry.has_image else None
        return body
    body = with_thumbnails(entry.to_json())
    return {"n": None, "decision": decision(entry), "has_image": False,
            **body, "image_url": None}
