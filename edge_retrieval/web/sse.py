"""``GET /api/events``: Server-Sent Events (``text/event-stream``) of the appliance's push hub (edge_retrieval/outputs/push.py)
— ``lookup_started``, ``lookup_finished``, ``status`` and ``catalog_changed`` — so the page is told instead of
polling.

waitress is threaded: an open stream holds one worker thread. So a stream takes one of the slots the live views
use (``web.threads`` - 2; beyond them 503 + Retry-After, and the page polls), it ends after ``sse.stream_max_s``
with a ``retry:`` hint (the browser reconnects, and gets the current status first), and it writes a heartbeat
comment after ``sse.heartbeat_s`` of silence. A page that closes its stream is seen within ``_GONE_CHECK_S``
through waitress's ``client_disconnected`` (``channel_request_lookahead``, set by ``edge_retrieval.web.serve``); a client
that vanished without closing is noticed at the next write, so it holds its thread at most ``heartbeat_s``."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import flask
from pydantic import BaseModel

from edge_retrieval.core.status import Status
from edge_retrieval.outputs.push import PushEvent, Stream
from edge_retrieval.web.common import appliance, entry_json, error, names_not_paths, take_stream_slot

bp = flask.Blueprint("sse", __name__)
_GONE_CHECK_S = 0.5  # how often a waiting stream asks waitress whether its page closed it


def _data(event: PushEvent) -> dict:
    """The event's JSON: a finished lookup as its history entry (with the page's URLs); the status with its
    camera's file path cut to a name (an event stream carries no bearer token); else as given."""
    if event.kind == "lookup_finished":
        return entry_json(event.data)
    if isinstance(event.data, Status):
        return names_not_paths(event.data.to_json(), [event.data.camera.spec])
    if isinstance(event.data, BaseModel):
        return event.data.model_dump(mode="json")
    return event.data


def _frames(stream: Stream, config, gone: Callable[[], bool] | None) -> Iterator[str]:
    yield f"retry: {int(config.retry_s * 1000)}\n\n"
    now = time.monotonic()
    deadline, written = now + config.stream_max_s, now
    while (left_s := deadline - now) > 0:
        if gone is not None and gone():  # the page closed it: free the thread now
            return
        quiet_left_s = written + config.heartbeat_s - now
        events = stream.next(min(left_s, quiet_left_s, _GONE_CHECK_S if gone is not None else quiet_left_s))
        now = time.monotonic()
        if events is None:  # ended: a slow client, or the appliance is stopping
            return
        if not events:
            if now - written >= config.heartbeat_s:
                yield ": heartbeat\n\n"
                written = now
            continue
        written = now
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
    gone = flask.request.environ.get("waitress.client_disconnected")
    response = flask.Response(flask.stream_with_context(_frames(stream, hub.config, gone)),
                              mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # a reverse proxy in front must not buffer the stream
    response.call_on_close(closed)
    return response
