"""The versioned JSON files of the device (a bundle's manifest, an index generation's meta), read into their
pydantic models with one error style: the file, the first bad field, and what to do about it."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from edge_retrieval.core.errors import ApplianceError

M = TypeVar("M", bound=BaseModel)


def read_json_model(path: Path, model: type[M], error: type[ApplianceError], *, format_version: int,
                    hint: str) -> M:
    """Read a versioned JSON file (a bundle manifest, an index generation's meta) into a pydantic ``model``
    whose first field is ``format_version``, parsing it once (an index's meta may list 100k items).

    A file of another ``format_version`` is refused for that alone; every other problem raises ``error`` naming
    the file and the first bad field, followed by ``hint`` (what to do about it)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: missing; {hint}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}); {hint}") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        errors = e.errors()
    version = [err for err in errors if err["loc"][:1] == ("format_version",)]
    err = version[0] if version else errors[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "json_invalid":
        why = f"not valid JSON ({err['msg']})"
    elif err["type"] in ("model_type", "model_attributes_type"):
        why = "must hold a JSON object"
    elif version:
        why = f"field 'format_version' is {err.get('input')!r}; this device reads {format_version}"
    elif err["type"] == "missing":
        why = f"missing field '{key}'"
    elif err["type"] == "extra_forbidden":
        why = f"unknown field '{key}'"
    else:
        why = f"field '{key}' is {err.get('input')!r}: {err['msg']}"
    raise error(f"{path}: {why}; {hint}") from None
