"""The live view: an MJPEG stream (one waitress thread per viewer, capped) and single frames."""
from __future__ import annotations

import time
from collections.abc import Iterator

import flask

from edge_retrieval.web.common import appliance, error, take_stream_slot, web_config
from edge_retrieval.web.services import Services

bp = flask.Blueprint("stream", __name__)

_STREAM_KEEPALIVE_S = 2.0  # with a stalled camera the last frame is re-sent this often (see _mjpeg)
_FIRST_FRAME_WAIT_S = 1.0  # how long /stream.mjpg waits for a first frame before answering 503


def _mjpeg(first: tuple[int, bytes], source: Services, interval_s: float) -> Iterator[bytes]:
    """multipart/x-mixed-replace parts, at most one per ``interval_s``.

    When no new frame arrives within the keep-alive time the last frame is sent again: writing is the
    only way waitress notices that a viewer has gone, and a never-writing stream would keep a worker
    thread forever. When the client disconnects, waitress closes this generator (GeneratorExit).
    """
    index, jpeg = first
    while True:
        sent_at = time.monotonic()
        yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(jpeg)).encode()
               + b"\r\n\r\n" + jpeg + b"\r\n")
        remaining_s = interval_s - (time.monotonic() - sent_at)
        if remaining_s > 0:
            time.sleep(remaining_s)
        newer = source.wait_frame_jpeg(index, _STREAM_KEEPALIVE_S)
        if newer is not None:
            index, jpeg = newer


@bp.get("/stream.mjpg")
def stream() -> flask.Response:
    """The live view; 503 without a camera frame or when every viewer slot is taken."""
    app_ = appliance()
    first = app_.latest_frame_jpeg() or app_.wait_frame_jpeg(-1, _FIRST_FRAME_WAIT_S)
    if first is None:
        return error(503, "no camera frame available")
    release = take_stream_slot(app_.metrics.http_streams_open)
    if release is None:
        return error(503, f"too many live viewers and event streams ({flask.current_app.config['MAX_STREAMS']}, "
                          "web.threads - 2); use /api/frame.jpg")
    response = flask.Response(_mjpeg(first, app_, 1.0 / max(web_config().stream_fps, 0.1)),
                              mimetype="multipart/x-mixed-replace; boundary=frame")
    response.headers["Cache-Control"] = "no-store"
    response.call_on_close(release)
    return response


@bp.get("/api/frame.jpg")
def frame() -> flask.Response:
    """The newest camera frame as one JPEG (the page polls it when the stream is refused)."""
    latest = appliance().latest_frame_jpeg()
    if latest is None:
        return error(404, "no camera frame available")
    response = flask.Response(latest[1], mimetype="image/jpeg")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Index"] = str(latest[0])
    return response
