"""A model directory's ``config.json``, read strictly: the fields ia3tools acts on must have the
types transformers expects, or the file is named in a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

from ia3tools.errors import FormatError
from ia3tools.formats.jsonstrict import load_json_file

CONFIG_NAME = "config.json"

# field -> (check, what it must be)
_FIELDS = {
    "architectures": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of strings"),
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
    "torch_dtype": (lambda v: isinstance(v, str), "a string"),
    "id2label": (lambda v: isinstance(v, dict), "an object"),
    "label2id": (lambda v: isinstance(v, dict), "an object"),
}


def read_model_config(directory: Path) -> dict | None:
    """The parsed ``config.json`` of ``directory``, or None when there is none."""
    path = Path(directory) / CONFIG_NAME
    if not os.path.lexists(path):
        return None
    doc = load_json_file(path, what="model config")
    if not isinstance(doc, dict):
        raise FormatError("model config is not a JSON object", path=path)
    for key, (ok, expected) in _FIELDS.items():
        if doc.get(key) is not None and not ok(doc[key]):
            raise FormatError(f"{key} must be {expected}", path=path)
    return doc


def architecture(config: dict | None) -> str:
    """The first entry of ``architectures`` ('' when there is none)."""
    return ((config or {}).get("architectures") or [""])[0]
