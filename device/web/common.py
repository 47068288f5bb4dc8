"""What the web blueprints share: JSON errors and the app's appliance and ``web:`` config."""
from __future__ import annotations

from typing import TYPE_CHECKING

import flask

from device.config import WebConfig

if TYPE_CHECKING:  # the web layer never imports model code at run time
    from device.appliance import Appliance

# Each open MJPEG stream holds one waitress worker thread for as long as the viewer watches; two threads
# always stay free for the API and the page's polling (config.web.threads is at least 4).
THREADS_KEPT_FOR_API = 2


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
