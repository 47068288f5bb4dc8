"""The JSON API: health, metrics, lookups (upload, "look up now", latest) and the catalog (list, an item and its
photos, thumbnails; enrol, add and remove photos, remove behind the bearer token)."""
from __future__ import annotations

import hmac
import json

import flask

from edge_retrieval.core.errors import InputError
from edge_retrieval.core.results import LookupResult
from edge_retrieval.outputs.metrics import CONTENT_TYPE
from edge_retrieval.web.common import appliance, entry_json, error, names_not_paths, web_config, with_thumbnails

bp = flask.Blueprint("api", __name__)

_CATALOG_PAGE_DEFAULT = 100
_CATALOG_PAGE_MAX = 1000


def _result_json(result: LookupResult | None) -> dict:
    """A LookupResult as JSON with a ``thumbnail_url`` for each candidate (and the match, if any).

    Before the first lookup: ``{"results": [], "timings_ms": {}, "source": null, "timestamp": null}``
    so the page needs no special case.
    """
    if result is None:
        return {"results": [], "timings_ms": {}, "source": None, "timestamp": None}
    return with_thumbnails(result.to_json())


def _has_token() -> bool:
    """Whether the request carries the configured bearer token (constant-time comparison)."""
    token = web_config().api_token
    scheme, _, given = flask.request.headers.get("Authorization", "").partition(" ")
    return (token is not None and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), token.encode()))


def _require_token() -> flask.Response | None:
    if web_config().api_token is None:
        return error(403, "catalog changes are disabled: set web.api_token in config.yaml")
    if not _has_token():
        return error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
    return None


def _public(document: dict, paths: list) -> dict:
    """``document`` as anyone may see it: whole with the bearer token, else with the file ``paths`` it
    mentions cut to their names."""
    return document if _has_token() else names_not_paths(document, paths)


def _uploaded_image() -> bytes:
    upload = flask.request.files.get("image")
    if upload is None:
        flask.abort(400, "missing multipart field 'image'")
    return upload.read()


# --- status ----------------------------------------------------------------------------------------

@bp.get("/api/health")
def health() -> flask.Response:
    """Camera, bundle, index, verification and uptime; 200 when ``ok``, else 503. File paths are shown
    only with the bearer token."""
    health = appliance().health()
    paths = [health.bundle.path, health.index.path, health.enrolled.store, health.camera.spec]
    response = flask.jsonify(_public(health.to_json(), paths))
    response.status_code = 200 if health.ok else 503
    return response


@bp.get("/api/status")
def status() -> flask.Response:
    """The page's status panel, polled every few seconds: camera, trigger, lookups/min, last error, CPU/RSS,
    index, verification, latest lookup (file paths cut to names without the bearer token, as in health)."""
    body = appliance().status()
    response = flask.jsonify(_public(body.to_json(), [body.camera.spec]))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/metrics")
def metrics() -> flask.Response:
    """Prometheus text exposition."""
    return flask.Response(appliance().metrics.exposition(), content_type=CONTENT_TYPE)


# --- lookups ---------------------------------------------------------------------------------------

@bp.get("/api/results/latest")
def latest() -> flask.Response:
    """The latest lookup (camera trigger, button or upload)."""
    response = flask.jsonify(_result_json(appliance().latest_result()))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/api/query")
def query() -> flask.Response:
    """Look up the uploaded image (multipart field ``image``)."""
    data = _uploaded_image()
    return flask.jsonify(_result_json(appliance().query_image(data, "upload")))


@bp.post("/api/lookup")
def lookup_now() -> tuple[flask.Response, int]:
    """Look up the next camera frame, whatever the trigger says."""
    appliance().request_lookup()
    return flask.jsonify(status="requested"), 202


# --- history ---------------------------------------------------------------------------------------

def _history():
    history = appliance().history
    if history is None:
        flask.abort(404, "no lookup history on this device (history: in config.yaml)")
    return history


@bp.get("/api/history")
def history_list() -> flask.Response:
    """The recent lookups, newest first (at most ``limit``), each a lookup result with ``n``, ``decision`` and
    ``image_url``."""
    try:
        limit = max(int(flask.request.args.get("limit", _history().config.size)), 0)
    except ValueError:
        return error(400, "limit must be an integer")
    entries = [entry_json(entry) for entry in _history().entries()[:limit]]
    response = flask.jsonify(entries=entries, size=_history().config.size)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/api/history.csv")
def history_csv() -> flask.Response:
    """The recent lookups as CSV (a download)."""
    response = flask.Response(_history().to_csv(), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="lookups.csv"'
    return response


@bp.get("/api/history/<int:n>/image.jpg")
def history_image(n: int) -> flask.Response:
    """The snapshot of lookup ``n`` (the camera frame or the uploaded photo, small)."""
    # numbers go on across restarts (only a store moved aside as unreadable starts again at 1): cache an hour
    return _jpeg(_history().image(n), f"no snapshot of lookup {n} (only the last {_history().config.size} are kept)",
                 max_age_s=3600)


# --- catalog ---------------------------------------------------------------------------------------

@bp.get("/api/catalog")
def catalog_list() -> flask.Response:
    """The catalog items whose id or label contains ``q`` (any case; all without it), paged by ``offset``
    and ``limit``; ``total`` counts the matching items."""
    try:
        offset = max(int(flask.request.args.get("offset", 0)), 0)
        limit = min(max(int(flask.request.args.get("limit", _CATALOG_PAGE_DEFAULT)), 0), _CATALOG_PAGE_MAX)
    except ValueError:
        return error(400, "offset and limit must be integers")
    items = appliance().catalog_items()
    q = flask.request.args.get("q", "").strip().casefold()
    if q:
        items = [it for it in items if q in it["id"].casefold() or q in it["label"].casefold()]
    return flask.jsonify(items=items[offset:offset + limit], total=len(items), offset=offset, limit=limit)


def _fields() -> dict:
    """The fields of a form or a JSON object body; InputError (400) for a JSON body that is not an object."""
    fields = flask.request.get_json(silent=True) if flask.request.is_json else flask.request.form
    if not isinstance(fields, dict) and not hasattr(fields, "getlist"):  # [1, 2], "str", 5, or broken JSON
        raise InputError("the body must be a JSON object (or a form) with 'label' (and 'id', 'attributes')")
    return fields


def _enrolment(fields) -> tuple[str, str | None, dict | None, bool]:
    """(label, id, attributes, replace) of an enrolment; ``attributes`` a JSON object (in a form: its text)."""
    label = str(fields.get("label", "")).strip()
    if not label:
        raise InputError("missing field 'label'")
    attributes = fields.get("attributes")
    if isinstance(attributes, str) and attributes.strip():
        if len(attributes) > 64 * 1024:
            raise InputError("the field 'attributes' is over 64 KB", http_status=413)
        try:
            attributes = json.loads(attributes)
        except ValueError:
            raise InputError("the field 'attributes' must be a JSON object, e.g. {\"sku\": \"A-12\"}") from None
    replace = str(fields.get("replace", "")).strip().lower() in ("1", "true", "yes", "on")
    return label, str(fields.get("id", "") or "").strip() or None, attributes or None, replace


@bp.post("/api/catalog")
def catalog_add() -> tuple[flask.Response, int] | flask.Response:
    """Enrol an item (multipart ``image`` + ``label`` (+ ``id``, ``attributes`` as JSON text, ``replace``)); needs
    the bearer token. 202: committed to the catalog store, indexed in the background; 409: the id is in the catalog
    already (add a photo to it, or say ``replace``)."""
    denied = _require_token()
    if denied is not None:
        return denied
    data = _uploaded_image()
    label, item_id, attributes, replace = _enrolment(flask.request.form)
    return flask.jsonify(appliance().enrol(data, label, item_id, attributes=attributes, replace=replace)), 202


@bp.post("/api/catalog/camera")
def catalog_add_frame() -> tuple[flask.Response, int] | flask.Response:
    """Enrol what the camera sees now (form or JSON ``label`` (+ ``id``, ``attributes``, ``replace``)); needs the
    bearer token."""
    denied = _require_token()
    if denied is not None:
        return denied
    label, item_id, attributes, replace = _enrolment(_fields())
    return flask.jsonify(appliance().enrol_frame(label, item_id, attributes=attributes, replace=replace)), 202


@bp.get("/api/catalog/<path:item_id>")
def catalog_item(item_id: str) -> flask.Response:
    """An item: id, label, attributes and its photos (each with its thumbnail URL)."""
    return flask.jsonify(appliance().item_details(item_id))


@bp.post("/api/catalog/<path:item_id>/photos")
def catalog_add_photo(item_id: str) -> tuple[flask.Response, int] | flask.Response:
    """One more photo of an item: multipart ``image`` (or, without one, what the camera sees now) and an optional
    ``photo`` name; needs the bearer token. 202; 404 unknown item; 409 a photo name in use, or the item is full."""
    denied = _require_token()
    if denied is not None:
        return denied
    data = _uploaded_image() if flask.request.files else None
    photo = str((flask.request.form if data is not None else _fields()).get("photo", "") or "").strip() or None
    return flask.jsonify(appliance().add_photo(item_id, data, photo)), 202


@bp.delete("/api/catalog/<path:item_id>")
def catalog_remove(item_id: str) -> flask.Response:
    """Remove an item (every photo of it), or with ``?photo=NAME`` one of its photos; needs the bearer token."""
    denied = _require_token()
    if denied is not None:
        return denied
    photo = flask.request.args.get("photo")
    if photo is not None:
        return flask.jsonify(appliance().remove_photo(item_id, photo))
    if not appliance().remove(item_id):
        return error(404, f"unknown catalog item {item_id!r}")
    return flask.jsonify(id=item_id, status="removed")


@bp.get("/api/catalog/<path:item_id>/thumb.jpg")
def catalog_thumbnail(item_id: str) -> flask.Response:
    """The item's JPEG thumbnail (its first photo, or ``?photo=NAME``)."""
    # an item can be re-enrolled under its id: cache briefly
    photo = flask.request.args.get("photo", "")
    return _jpeg(appliance().thumbnail(item_id, photo), f"no thumbnail for catalog item {item_id!r}", max_age_s=60)


def _jpeg(jpeg: bytes | None, missing: str, *, max_age_s: int) -> flask.Response:
    """A JPEG answer cached ``max_age_s``, or 404 with ``missing`` when there is none."""
    if jpeg is None:
        return error(404, missing)
    response = flask.Response(jpeg, mimetype="image/jpeg")
    response.headers["Cache-Control"] = f"max-age={max_age_s}"
    return response
