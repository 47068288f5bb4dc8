"""``GET /api/events``: Server-Sent Events (``text/event-stream``) of the appliance's push hub (device/push.py)
— ``lookup_started``, ``lookup_finished``, ``status`` and ``catalog_changed`` — so the page is told instead of
polling.

waitress is threaded: an open stream holds one worker thread. So a stream takes one of the slots the live views
use (``web.threads`` - 2; beyond them 503 + Retry-After, and the page polls), it ends after ``sse.stream_max_s``
with a ``retry:`` hint (the browser reconnects, and gets the current status first), and it writes a heartbeat
comment after ``sse.heartbeat_s`` of silence: writing is how waitress notices a client that went away, so such
a client holds its thread at most that long."""
from __future__ import annotations

import json
import time
from typing import Iterator

import flask

from device.push import PushEvent, Stream

from .common import appliance, entry_json, error, take_stream_slot

bp = flask.Blueprint("sse", __name__)


def _data(event: PushEvent) -> dict:
    """The event's JSON: a finished lookup as its history entry (with the page's URLs), else as given."""
    if event.kind == "lookup_finished":
        return entry_json(event.data)
    return event.data


def _frames(stream: Stream, config) -> Iterator[str]:
    yield f"retry: {int(config.retry_s * 1000)}\n\n"
    deadline = time.monotonic() + config.stream_max_s
    while (left_s := deadline - time.monotonic()) > 0:
        events = stream.next(min(config.heartbeat_s, left_s))
        if events is None:  # ended: a slow client, or the appliance is stopping
            return
        if not events:
            yield ": heartbeat\n\n"
            continue
        for event in events:
            body = json.dumps(_data(event), separators=(",", ":"))
            yield f"event: {event.kind}\ndata: {body}\n\n"


@bp.get("/api/events")
def events() -> flask.Response:
    """The event stream; 503 + Retry-After when every long-lived slot is taken (the page then polls)."""
    app_ = appliance()
    hub = app_.push
    release = take_stream_slot(app_.metrics.http_event_streams_open)
    if release is None:
        return error(503, f"too many live viewers and event streams ({flask.current_app.config['MAX_STREAMS']}, "
                          "web.threads - 2); poll /api/status", **{"Retry-After": "15"})
    stream = hub.open()

    def closed() -> None:
        stream.close()
        release()

    # stream_with_context: a finished lookup's URLs are built with url_for while the stream runs
    response = flask.Response(flask.stream_with_context(_frames(stream, hub.config)), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # a reverse proxy in front must not buffer the stream
    response.call_on_close(closed)
    return response
