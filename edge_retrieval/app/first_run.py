"""``edge-retrieval init FOLDER``: a place for one's own catalog, apart from the demo's. It writes a small
config.yaml into FOLDER (the camera, a random API token, the catalog folder to index at the first start) and an
empty FOLDER/catalog/ for the photos; every path in that config is relative to FOLDER, so the index, the catalog
store and the history live in FOLDER/var/ and never touch the demo's state (var/ of the checkout)."""
from __future__ import annotations

import secrets
from pathlib import Path

from edge_retrieval.core.errors import ConfigError

STARTER = """\
# Your appliance, made by `edge-retrieval init`. Every other setting keeps its default (config.yaml in the
# source documents them all, with units). Paths are relative to this file's folder: the index, the catalog store
# and the history go under var/ here.

camera:
  source: {camera}   # /dev/videoN or N, csi://0, rtsp://user:pass@host/stream, a video file, a folder, none

catalog:
  build_from: catalog       # one photo per item in ./catalog (file name = id and label), indexed at the first
                            # start (and while the index is empty); later: `edge-retrieval index build --config
                            # THIS-FILE --catalog catalog`, `catalog add`, or the page's catalog manager

web:
  api_token: {token}   # the page's catalog manager asks for it (enrol, delete)
"""


def write_starter(folder: Path, camera: str) -> Path:
    """Write ``folder``/config.yaml and make ``folder``/catalog/; returns the config's path. Raises ConfigError
    when a config.yaml is there already (it is never overwritten)."""
    folder = Path(folder).expanduser()
    config = folder / "config.yaml"
    if config.exists():
        raise ConfigError(f"{config} exists already: use it (edge-retrieval serve --config {config}), or give "
                          "init another folder")
    try:
        (folder / "catalog").mkdir(parents=True, exist_ok=True)
        config.write_text(STARTER.format(camera=_yaml_string(camera), token=secrets.token_urlsafe(18)))
    except OSError as e:
        raise ConfigError(f"cannot write {config}: {e.strerror or e}") from None
    return config


def _yaml_string(text: str) -> str:
    """A YAML scalar that reads back as ``text`` (a camera URL may hold ':', '#' or '@')."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
