"""Typed errors. Every failure a user can cause is an ``Ia3Error``: the CLI prints its one-line
message and exits with ``exit_code``; nothing else reaches the user as a traceback."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass


def printable(text: str) -> str:
    """``text`` on one line: control and format characters (newlines, escapes, bidi overrides) and
    undecodable bytes of file names are shown as escapes, so a hostile name cannot break or forge
    a line of output."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0xD800 <= ord(ch) <= 0xDFFF:  # a surrogate escape: a byte that is not valid UTF-8
            out.append(f"\\x{ord(ch) & 0xFF:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class Notice:
    """A warning: a stable ``code`` for machines, a one-line ``message`` for people, and what it is
    about (a module of the adapter, a file)."""

    code: str
    message: str
    module: str | None = None
    file: str | None = None

    def line(self) -> str:
        where = f"{self.module}: " if self.module else ""
        return printable(f"warning: {where}{self.message}")


class Ia3Error(Exception):
    """Base class: a problem with the inputs or the output path, reported as one line."""

    exit_code = 1
    code = "error"  # a stable name for machines (the JSON envelope's error.code)

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, tensor: str | None = None,
                 code: str | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        if code is not None:
            self.code = code
        super().__init__(message)

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.tensor is not None:
            where.append(f"tensor '{self.tensor}'")
        prefix = ": ".join(where)
        return printable(f"{prefix}: {self.message}" if prefix else self.message)


class FormatError(Ia3Error):
    """A checkpoint or adapter file is malformed (header, offsets, index, pickle, JSON)."""

    code = "format"


class AdapterError(Ia3Error):
    """An adapter directory is not a usable PEFT IA3 adapter (config or tensor names)."""

    code = "adapter"


class PlanError(Ia3Error):
    """The adapter does not fit the base: a vector has no target, a shape or orientation is wrong."""

    code = "misfit"


class FoldError(Ia3Error):
    """Folding produced an unusable result (e.g. an fp16 weight overflowing to inf)."""

    code = "fold"


class OutputError(Ia3Error):
    """The output path is unusable (exists, lies inside an input, disk full)."""

    code = "output"


class BlendError(Ia3Error):
    """The adapters cannot be blended as asked."""

    code = "blend"


class ExportError(Ia3Error):
    """The model could not be exported, or its export failed the parity check."""

    code = "export"


class ExtractError(Ia3Error):
    """The merged checkpoint is not the base with an IA3 adapter folded in (names, dtypes or shapes
    changed, a change no fold explains, non-finite values)."""

    code = "extract"


class OptionError(Ia3Error):
    """An option of the Python API has a value it cannot take (the command line checks its own)."""

    code = "usage"
    exit_code = 2


class MissingDependency(Ia3Error):
    """An optional part of ia3tools is used without the extra that installs it."""

    code = "missing-dependency"


def require(module: str, extra: str, needed_for: str):
    """Import ``module``, or fail in one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{needed_for} needs {module}, which is not installed: "
                                f"pip install 'ia3tools[{extra}]'") from None


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
