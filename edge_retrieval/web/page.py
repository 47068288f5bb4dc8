"""The page: one HTML template; its JavaScript (static/app.js) uses the same JSON API as everyone else."""
from __future__ import annotations

import flask

from edge_retrieval.web.common import web_config

bp = flask.Blueprint("page", __name__)


@bp.get("/")
def index() -> str:
    """The appliance's page."""
    return flask.render_template("index.html", stream_fps=web_config().stream_fps)


@bp.get("/favicon.ico")
def favicon() -> flask.Response:
    """Browsers ask for /favicon.ico whatever the page links: the same SVG icon."""
    return flask.redirect(flask.url_for("static", filename="favicon.svg"), code=301)
