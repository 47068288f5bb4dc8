"""The page: one HTML template; its JavaScript (static/app.js) uses the same JSON API as everyone else."""
from __future__ import annotations

import flask

from .common import web_config

bp = flask.Blueprint("page", __name__)


@bp.get("/")
def index() -> str:
    """The appliance's page."""
    return flask.render_template("index.html", stream_fps=web_config().stream_fps)
