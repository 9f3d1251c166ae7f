"""Typed errors. Every failure a user can cause is an ``Ia3Error``: the CLI prints its one-line
message and exits with ``exit_code``; nothing else reaches the user as a traceback."""

from __future__ import annotations

import os


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
        return f"{prefix}: {self.message}" if prefix else self.message


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
