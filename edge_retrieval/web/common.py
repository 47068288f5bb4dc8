"""What the web blueprints share: JSON errors, the app's appliance and ``web:`` config, the slots of long-lived
answers, and a lookup's JSON with the page's URLs."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import flask

from edge_retrieval.core.config import WebConfig
from edge_retrieval.outputs.history import Entry
from edge_retrieval.web.services import Services

if TYPE_CHECKING:  # the web layer never imports model code at run time
    from edge_retrieval.core.results import LookupResult

# Each open MJPEG stream or event stream holds one waitress worker thread for as long as it is open; together
# they take at most threads - 2, so two threads always stay free for the API (config.web.threads is at least 4).
THREADS_KEPT_FOR_API = 2


def error(status: int, message: str, **headers: str) -> flask.Response:
    """A JSON error response ``{"error": message}``."""
    response = flask.jsonify(error=message)
    response.status_code = status
    response.headers.update(headers)
    return response


def appliance() -> Services:
    """The appliance of the current app."""
    return flask.current_app.extensions["appliance"]


def web_config() -> WebConfig:
    """The ``web:`` section of the current app."""
    return flask.current_app.extensions["web_config"]


class StreamSlots:
    """The slots of one app's long-lived answers (live views and event streams share them: each holds a waitress
    thread), each counted on its metrics gauge too."""

    def __init__(self) -> None:
        self._open = 0
        self._lock = threading.Lock()

    def take(self, gauge, limit: int) -> Callable[[], None] | None:
        """A slot counted on ``gauge``; returns its release (safe to call more than once), or None when ``limit``
        are open."""
        with self._lock:
            if self._open >= limit:
                return None
            self._open += 1
            gauge.inc()
        released = threading.Event()

        def release() -> None:
            with self._lock:  # close() may be called more than once: count the stream out exactly once
                if not released.is_set():
                    released.set()
                    self._open -= 1
                    gauge.dec()
        return release


def take_stream_slot(gauge) -> Callable[[], None] | None:
    """One of the current app's ``MAX_STREAMS`` stream slots (see StreamSlots), or None when every one is taken."""
    app = flask.current_app
    return app.extensions["stream_slots"].take(gauge, app.config["MAX_STREAMS"])


def names_not_paths(document: dict, paths: list) -> dict:
    """``document`` with every absolute file path of ``paths`` it mentions cut to its file name: anyone on the
    LAN may read the health and the status, and the layout of the device's disk is none of their business."""
    names = {p: PurePosixPath(p).name for p in paths
             if isinstance(p, str) and p.startswith("/") and not p.startswith("/dev/")}

    def scrub(value):
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, str):
            for path in sorted(names, key=len, reverse=True):
                value = value.replace(path, names[path])
        return value

    return scrub(document)


def with_thumbnails(body: dict) -> dict:
    """``body`` (a LookupResult's JSON) with a ``thumbnail_url`` (of the photo that matched) on each candidate, on
    the match and on every item of ``matches``."""
    candidates = list(body["results"]) + ([body["match"]] if body.get("match") else []) + list(body.get("matches") or [])
    for candidate in candidates:
        photo = {"photo": candidate["photo"]} if candidate.get("photo") else {}  # the photo that matched
        candidate["thumbnail_url"] = flask.url_for("api.catalog_thumbnail", item_id=str(candidate["id"]), **photo)
    return body


def entry_json(entry: Entry | LookupResult) -> dict:
    """A history entry as ``GET /api/history`` lists it (``n``, ``decision``, ``image_url``, thumbnails); a bare
    LookupResult (an appliance without a history) the same way, with ``n`` and ``image_url`` null."""
    if isinstance(entry, Entry):
        body = with_thumbnails(entry.to_json())
        body["image_url"] = flask.url_for("api.history_image", n=entry.n) if entry.has_image else None
        return body
    body = with_thumbnails(entry.to_json())
    return {"n": None, "decision": entry.decision, "has_image": False,
            **body, "image_url": None}
