"""JSON reading that refuses what Python's json module silently accepts: duplicate keys
(last-wins would let two readers disagree on a file) and NaN/Infinity literals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ia3tools.errors import FormatError
from ia3tools.formats.files import read_small


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):  # rare: find the first repeated key for the message
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return d


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str, *, path: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse ``text``; any problem becomes a one-line ``FormatError`` naming ``path``."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        raise FormatError(f"duplicate key {exc.args[0]!r} in {what}", path=path) from None
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply", path=path) from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise FormatError(f"{what} is not valid JSON ({exc})", path=path) from None


def load_json_file(path: Path, *, what: str = "JSON", max_bytes: int = 100 * 1024 * 1024) -> Any:
    """Read a small JSON side file (config, index) strictly; FIFOs, devices and directories are
    refused without being read."""
    raw = read_small(Path(path), what, max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not UTF-8", path=path) from None
    return loads_strict(text, path=path, what=what)
