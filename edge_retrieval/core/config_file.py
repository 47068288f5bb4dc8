"""Reading config.yaml into the one typed ``Config`` (edge_retrieval/core/config.py), in one place: YAML errors
with line and column, keys that moved between sections, validation errors that name the file and the key (never a
secret's value), and every path and keyword resolved — relative paths against the config file's folder, bundles
by name, camera keywords."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, get_args

import yaml
from pydantic import BaseModel, ValidationError

from edge_retrieval.core.config import BUNDLES, Config
from edge_retrieval.core.errors import ConfigError

log = logging.getLogger(__name__)

CAMERA_KEYWORDS = ("demo", "none")  # camera.source keywords, never paths (a file of that name: ./demo)


def resolve_bundle(value: Path, base: Path) -> Path:
    """A bundle setting as a folder: a bare name of a shipped bundle (``sscd-distilled``) is that bundle unless a
    folder of that name exists beside the config; anything else is a path, relative to ``base`` (the config's folder)."""
    if value.is_absolute():
        return value
    local = base / value
    if len(value.parts) == 1 and not local.exists() and (BUNDLES / value.name / "manifest.json").is_file():
        return BUNDLES / value.name
    return local


def _resolve(cfg: Config, base: Path) -> Config:
    def fix(p: Optional[Path]) -> Optional[Path]:
        return p if p is None or p.is_absolute() else (base / p)

    cam = cfg.camera
    src = cam.source
    if src not in CAMERA_KEYWORDS and "://" not in src and not src.isdigit() and not src.startswith("/"):
        src = str(base / src)
    return cfg.model_copy(update={
        "camera": cam.model_copy(update={"source": src}),
        "encoder": cfg.encoder.model_copy(update={
            "bundle": resolve_bundle(cfg.encoder.bundle, base),
            "fallback_bundle": cfg.encoder.fallback_bundle and resolve_bundle(cfg.encoder.fallback_bundle, base)}),
        "index": cfg.index.model_copy(update={"path": fix(cfg.index.path)}),
        "catalog": cfg.catalog.model_copy(update={"build_from": fix(cfg.catalog.build_from),
                                                  "labels": fix(cfg.catalog.labels),
                                                  "enrolled_dir": fix(cfg.catalog.enrolled_dir),
                                                  "store": fix(cfg.catalog.store)}),
        "history": cfg.history.model_copy(update={"dir": fix(cfg.history.dir)}),
        "mqtt": cfg.mqtt.model_copy(update={k: fix(getattr(cfg.mqtt, k))
                                            for k in ("ca_file", "cert_file", "key_file", "password_file")}),
    })


def _model_in(annotation) -> type[BaseModel]:
    """The section model an annotation holds (itself, or the model inside an Optional / tagged union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        try:
            return _model_in(arg)
        except TypeError:
            continue
    raise TypeError(f"no section model in {annotation!r}")


def _is_secret(loc: list) -> bool:
    """Whether the key at ``loc`` is marked ``SECRET`` (its value is never echoed in an error)."""
    model: type[BaseModel] = Config
    try:
        for part in loc[:-1]:
            model = _model_in(model.model_fields[str(part)].annotation)
        field = model.model_fields.get(str(loc[-1])) if loc else None
    except (KeyError, TypeError):
        return False
    extra = field.json_schema_extra if field is not None else None
    return isinstance(extra, dict) and extra.get("secret") is True


def _describe(e: ValidationError, path: Path) -> str:
    lines = []
    for err in e.errors():
        loc = [p for p in err["loc"] if not str(p).startswith("=")]  # union tags (see Decision)
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            section = loc[:-1]
            model = Config
            for part in section:
                model = _model_in(model.model_fields[str(part)].annotation)
            allowed = ", ".join(k for k in model.model_fields if k != "source_file")
            lines.append(f"{path}: unknown key '{key}' (allowed here: {allowed})")
        else:
            got = "value not shown" if _is_secret(loc) else f"got {err.get('input')!r}"
            lines.append(f"{path}: {key}: {err['msg']} ({got})")
    return "\n".join(lines)


# Keys that moved between sections: an older config.yaml keeps working (with a warning) unless it sets both.
_MOVED = {("web", "max_pixels"): ("images", "max_pixels")}


def _moved_keys(raw: dict, path: Path) -> dict:
    raw = dict(raw)
    for (old_section, key), (new_section, new_key) in _MOVED.items():
        old = raw.get(old_section)
        if not isinstance(old, dict) or key not in old:
            continue
        new = raw.get(new_section) or {}
        if not isinstance(new, dict):
            continue  # validation names the bad section
        if new_key in new:
            raise ConfigError(f"{path}: {old_section}.{key} moved to {new_section}.{new_key}; set only the latter")
        log.warning("%s: %s.%s is now %s.%s; please move it", path, old_section, key, new_section, new_key)
        raw[old_section] = {k: v for k, v in old.items() if k != key}
        raw[new_section] = {**new, new_key: old[key]}
    return raw


def load_config(path: str | Path | None) -> Config:
    """Read and validate config.yaml (None = all defaults, paths relative to the current folder)."""
    if path is None:
        return _resolve(Config(), Path.cwd())
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (camera:, encoder:, …)")
    if "source_file" in raw:
        raise ConfigError(f"{path}: unknown key 'source_file'")
    raw = _moved_keys(raw, path)
    try:
        cfg = Config.model_validate({**raw, "source_file": path})
    except ValidationError as e:
        raise ConfigError(_describe(e, path)) from None
    return _resolve(cfg, path.resolve().parent)
