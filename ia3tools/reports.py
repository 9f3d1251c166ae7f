"""What every command returns: a typed report, and the one JSON envelope they all share.

Every report has ``ok``, ``command``, ``warnings`` (a list of ``Notice``) and its own fields;
``to_json()`` gives the envelope that ``--json`` prints, documented by ``docs/schema.json``:

    {"ok": true, "command": "merge", "warnings": [{"code": ..., "message": ...}], ...fields}

A failure is ``failure_json(command, error)``: ``ok`` false and an ``error`` object
``{code, message, file?, tensor?}``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ia3tools.errors import Ia3Error, Notice, printable


def _plain(value: Any) -> Any:
    """A report value as JSON data: dataclasses become objects (None fields kept), paths strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


@dataclass
class Report:
    """Base of every command's report."""

    command: ClassVar[str] = ""
    warnings: list[Notice] = field(default_factory=list, kw_only=True)

    @property
    def ok(self) -> bool:
        return True

    def to_json(self) -> dict:
        body = _plain(self)
        warnings = body.pop("warnings")
        return {"ok": self.ok, "command": self.command, "warnings": warnings, **body}


def failure_json(command: str, error: BaseException, warnings: list[Notice] = ()) -> dict:
    """The envelope of a command that failed (``error`` an ``Ia3Error`` or an interruption)."""
    if isinstance(error, Ia3Error):
        detail = {"code": error.code, "message": printable(error.message)}
        if error.path is not None:
            detail["file"] = printable(error.path)
        if error.tensor is not None:
            detail["tensor"] = printable(error.tensor)
    else:
        detail = {"code": "interrupted", "message": "interrupted"}
    return {"ok": False, "command": command, "warnings": [_plain(w) for w in warnings], "error": detail}


@dataclass(frozen=True)
class ShardRow:
    """One weights file of a checkpoint: its name, how many tensors and bytes it holds."""

    name: str
    tensors: int
    bytes: int
