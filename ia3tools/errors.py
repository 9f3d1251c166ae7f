"""Typed errors. Every failure a user can cause is an ``Ia3Error``: the CLI prints its one-line
message and exits with ``exit_code``; nothing else reaches the user as a traceback."""

from __future__ import annotations

import os
import unicodedata


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


class Ia3Error(Exception):
    """Base class: a problem with the inputs or the output path, reported as one line."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, tensor: str | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        super().__init__(str(self))

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


class AdapterError(Ia3Error):
    """An adapter directory is not a usable PEFT IA3 adapter (config or tensor names)."""


class PlanError(Ia3Error):
    """The adapter does not fit the base: a vector has no target, a shape or orientation is wrong."""


class FoldError(Ia3Error):
    """Folding produced an unusable result (e.g. an fp16 weight overflowing to inf)."""


class OutputError(Ia3Error):
    """The output path is unusable (exists, lies inside an input, disk full)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
