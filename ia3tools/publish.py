"""Publishing an output directory atomically, safe against crashes and concurrent runs.

Every run that writes ``OUT`` works beside it, in OUT's parent, under names that start with
``.<OUT name>.ia3tools-<digest>-<token>`` (``digest`` identifies OUT's name, which is shortened
there so the names always fit the file-name limit; ``token`` is random per run):

- ``….lock``: a file the run holds an exclusive lock on (``flock``) from before it creates anything
  until after it has removed everything. A leftover is *stale* exactly when its lock can be taken:
  the kernel drops a lock when its holder dies, whatever its PID or PID namespace.
- ``….new``: the staging directory, written, fsynced and validated before it is published.
- ``….old``: only during ``--force`` where no atomic exchange exists: the previous OUT, moved aside.

Publishing without ``--force`` renames ``….new`` to OUT with no-replace semantics, so an output that
another process created meanwhile is never replaced. With ``--force`` it swaps the two atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS), after checking that
OUT is still the directory it found at the start. Without an exchange, OUT is moved to ``….old``
and ``….new`` renamed into its place. A process killed between those two renames leaves OUT
missing and its previous content in ``….old``: the next run for OUT finds the stale lock and puts
``….old`` back (it restores, never deletes, the only copy). SIGINT, SIGTERM and SIGHUP that arrive
during the renames are acted on once they are done.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from ia3tools.atomic import Lock, exchange, rename_noreplace
from ia3tools.errors import Ia3Error, Notice, OutputError
from ia3tools.formats.files import os_reason

MARK = ".ia3tools-"  # every name ia3tools creates beside an output contains this
_NAME_BYTES = 40  # of OUT's name kept in the hidden names (the rest is identified by the digest)


def _stem(out: Path) -> str:
    name = out.name
    short = name
    while len(os.fsencode(short)) > _NAME_BYTES:
        short = short[:-1]
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    return f".{short}{MARK}{digest}-"


# --- recovery -------------------------------------------------------------------------------

def _leftovers(out: Path) -> dict[str, set[str]]:
    """Token -> kinds ("new", "old", "lock") of the hidden names beside ``out``."""
    stem = _stem(out)
    try:
        entries = os.listdir(out.parent)
    except OSError:
        return {}
    found: dict[str, set[str]] = {}
    for entry in entries:
        if entry.startswith(stem):
            token, _, kind = entry[len(stem):].partition(".")
            if kind in ("new", "old", "lock"):
                found.setdefault(token, set()).add(kind)
    return found


def recover(out: Path) -> list[Notice]:
    """Clean up after runs for ``out`` that died, restoring a previous output that a killed
    ``--force`` left moved aside. Returns what was restored, in words."""
    out = Path(out)
    notes = []
    for token in _leftovers(out):
        base = out.parent / f"{_stem(out)}{token}"
        lock = Lock.take_over(Path(f"{base}.lock"))
        if lock is None:
            continue  # its run is alive
        try:
            old, new = Path(f"{base}.old"), Path(f"{base}.new")
            if os.path.lexists(old) and not os.path.lexists(out):
                with contextlib.suppress(FileExistsError):
                    rename_noreplace(old, out)
                    notes.append(Notice("restored-output", f"restored {out} (an interrupted --force run had moved "
                                        "it aside)", file=str(out)))
            if os.path.lexists(old) and os.path.lexists(out):
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(new, ignore_errors=True)
        finally:
            lock.release()
    return notes


# --- the output path ------------------------------------------------------------------------

def _resolve(path: Path, what: str, out: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        reason = os_reason(exc) if isinstance(exc, OSError) else "symbolic link loop"
        raise OutputError(f"cannot resolve {what}: {reason}", path=out) from None


def check_output_path(out: str | os.PathLike, inputs, force: bool) -> list[Notice]:
    """Refuse an output equal to, inside, or containing an input, and an existing one unless
    forced; first clean up after dead runs for it. Returns what that recovery restored."""
    out = Path(out)
    real_out = _resolve(out, "the output path", out)
    for inp in inputs:
        real_in = _resolve(Path(inp), f"the input {inp}", out)
        if real_out == real_in or real_in in real_out.parents:
            raise OutputError(f"output is inside the input {inp}", path=out)
        if real_out in real_in.parents:
            raise OutputError(f"output would contain the input {inp}", path=out)
    notes = recover(out)
    if os.path.lexists(out):
        if not force:
            raise OutputError("output already exists (use --force to replace it)", path=out, code="output-exists")
        if out.is_symlink() or not out.is_dir():
            raise OutputError("output exists and is not a directory; refusing to replace it", path=out)
    for parent in out.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise OutputError(f"{parent} is not a directory", path=out)
            break
    return notes


# --- staging --------------------------------------------------------------------------------

def _identity(path: Path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP while the output is renamed into place; act on them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    previous = {}
    for s in (getattr(signal, n) for n in names if hasattr(signal, n)):
        previous[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (and itself)."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDWR if sys.platform == "win32" else os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened (or fsynced) there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_error(exc: OSError, out: Path) -> OutputError:
    """An OSError met while writing or publishing the output, as one line naming the output."""
    reason = {errno.ENOSPC: "disk full", errno.EFBIG: "file size limit reached", errno.EDQUOT: "disk quota exceeded"}
    why = reason.get(exc.errno) or os_reason(exc)
    code = "disk-full" if exc.errno in reason else "output"
    return OutputError(f"cannot write the output: {why}; nothing was written", path=out, code=code)


class Staging:
    """A staging directory that becomes ``out`` on ``publish()`` and vanishes on any failure."""

    def __init__(self, out: str | os.PathLike, force: bool = False, durable: bool = True, scratch: bool = False):
        self.out = Path(out)
        self.force = force
        self.scratch = scratch  # a work directory beside ``out`` that is never published
        self.durable = durable  # fsync before the rename: the output survives a power loss
        base = f"{self.out.parent / _stem(self.out)}{secrets.token_hex(8)}"
        self.path, self._old, self._lock_path = Path(f"{base}.new"), Path(f"{base}.old"), Path(f"{base}.lock")
        self.notes: list[Notice] = []  # warnings for the report (what recovery restored)
        self._lock: Lock | None = None
        self._created: list[Path] = []
        self.published = False

    def __enter__(self) -> "Staging":
        try:
            self._created = [p for p in reversed(self.out.parents) if not os.path.lexists(p)]
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.notes += recover(self.out)
            self._seen = _identity(self.out)
            if self._seen is not None and not (self.force or self.scratch):
                raise OutputError("output already exists (use --force to replace it)", path=self.out,
                                  code="output-exists")
            self._lock = Lock.create(self._lock_path)
            self.path.mkdir()
        except BaseException as exc:
            self._cleanup(failed=True)
            raise self._translate(exc) from None
        return self

    def __exit__(self, exc_type, exc, tb):
        self._cleanup(failed=exc_type is not None)
        if exc is not None:
            translated = self._translate(exc)
            if translated is not exc:
                raise translated from None
        return False

    def publish(self, validate: Callable[[Path], None]) -> None:
        """fsync, validate with ``validate(staging path)``, then rename into place atomically."""
        assert not self.scratch, "a scratch directory is never published"
        if self.durable:
            fsync_tree(self.path)
        validate(self.path)
        with _signals_deferred():
            if self._seen is None:
                try:
                    rename_noreplace(self.path, self.out)
                except FileExistsError:
                    raise OutputError("output appeared while this run was working (another process wrote it); "
                                      "it was left as it is", path=self.out, code="output-appeared") from None
            else:
                if _identity(self.out) != self._seen:
                    raise OutputError("output was replaced by another process while this run was working; "
                                      "it was left as it is", path=self.out, code="output-replaced")
                if not exchange(self.path, self.out):  # after a swap, self.path holds the old output
                    os.rename(self.out, self._old)
                    try:
                        rename_noreplace(self.path, self.out)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            rename_noreplace(self._old, self.out)
                        raise
            self.published = True
            if self.durable:
                fsync_dir(self.out.parent)

    def _cleanup(self, failed: bool) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if os.path.lexists(self._old):
            if not os.path.lexists(self.out):  # never drop the only copy of the previous output
                with contextlib.suppress(OSError):
                    rename_noreplace(self._old, self.out)
            if os.path.lexists(self.out):
                shutil.rmtree(self._old, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if failed and not self.published:
            for parent in reversed(self._created):
                try:
                    parent.rmdir()
                except OSError:
                    break

    def _translate(self, exc: BaseException) -> BaseException:
        """Errors name the user's output path, never the staging directory."""
        if isinstance(exc, Ia3Error):
            if exc.path is not None:
                exc.path = _user_path(exc.path, self.path, self.out)
            exc.message = exc.message.replace(str(self.path), str(self.out))
            return exc
        if isinstance(exc, OSError):
            return output_error(exc, self.out)
        return exc


def _user_path(path: str, staging: Path, out: Path) -> str:
    try:
        return str(out / Path(path).relative_to(staging))
    except ValueError:
        return path
