"""Opening input files safely: only regular files, never blocking, one clear error per failure.

A FIFO, device or socket given as an input (or reached through a symlink) could block a read
forever or feed it endless bytes, so every input file is checked with ``stat`` before it is opened,
opened with ``O_NONBLOCK`` (a FIFO swapped in after the check cannot block the open), and checked
again on the open descriptor. Errors name the file and say what is wrong with it in words.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

from ia3tools.errors import FormatError

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0) \
    | getattr(os, "O_BINARY", 0)


_seek_lock = threading.Lock()


def _pread_fallback(fd: int, length: int, offset: int) -> bytes:
    with _seek_lock:  # seek + read is one positioned read only while nobody else seeks
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, length)


def _pwrite_fallback(fd: int, data, offset: int) -> int:
    with _seek_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def _preadinto_fallback(fd: int, buffer, offset: int) -> int:
    data = pread(fd, len(buffer), offset)
    buffer[: len(data)] = data
    return len(data)


def preadinto(fd: int, buffer, offset: int) -> int:
    """Read up to ``len(buffer)`` bytes at ``offset`` straight into ``buffer``; the count read."""
    if hasattr(os, "preadv") and pread is os.pread:
        return os.preadv(fd, [buffer], offset)
    return _preadinto_fallback(fd, buffer, offset)


# os.pread and os.pwrite do not exist on Windows: there, one lock serialises seek + read/write.
pread = getattr(os, "pread", _pread_fallback)
pwrite = getattr(os, "pwrite", _pwrite_fallback)


def os_reason(exc: OSError) -> str:
    """An OSError in a few words ("symbolic link loop" rather than "Too many levels of ...")."""
    words = {errno.ELOOP: "symbolic link loop", errno.ENOENT: "no such file or directory",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ENOTDIR: "a parent is not a directory", errno.ENAMETOOLONG: "file name too long",
             errno.EISDIR: "is a directory"}
    return words.get(exc.errno, (exc.strerror or str(exc)).lower())


def _code(exc: OSError) -> str:
    return "not-found" if exc.errno == errno.ENOENT else "format"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def stat_input(path: Path, what: str = "file") -> os.stat_result:
    """``os.stat`` of an input, as a one-line ``FormatError`` when it fails."""
    try:
        return os.stat(path)
    except OSError as exc:
        raise FormatError(f"cannot open {what}: {os_reason(exc)}", path=path, code=_code(exc)) from None
    except ValueError:  # an embedded NUL in the name
        raise FormatError(f"cannot open {what}: invalid file name", path=path) from None


def require_regular(path: Path, what: str = "file") -> os.stat_result:
    """The stat of ``path`` when it is (or links to) a regular file; otherwise a ``FormatError``."""
    st = stat_input(path, what)
    if not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode)
        raise FormatError(f"{what} is {kind}, not a regular file" if kind.startswith("a ") else
                          f"{what} is not a regular file", path=path)
    return st


def open_regular(path: Path, what: str = "file") -> int:
    """A read-only descriptor of the regular file at ``path``, opened without ever blocking."""
    before = require_regular(path, what)
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        raise FormatError(f"cannot open {what}: {os_reason(exc)}", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise FormatError(f"{what} was replaced while being opened", path=path)
    return fd


def read_chunks(path: Path, what: str, chunk: int = 1 << 20, max_bytes: int | None = None):
    """The content of the regular file at ``path``, chunk by chunk; a read error (or more than
    ``max_bytes``) is a ``FormatError`` naming the file."""
    fd = open_regular(path, what)
    try:
        total = 0
        while True:
            try:
                data = os.read(fd, chunk)
            except OSError as exc:
                raise FormatError(f"cannot read {what}: {os_reason(exc)}", path=path) from None
            if not data:
                return
            total += len(data)
            if max_bytes is not None and total > max_bytes:
                raise FormatError(f"{what} is larger than {max_bytes} bytes", path=path)
            yield data
    finally:
        os.close(fd)


def read_small(path: Path, what: str, max_bytes: int) -> bytes:
    """The whole content of a small regular file (a JSON config, an index)."""
    return b"".join(read_chunks(path, what, max_bytes=max_bytes))


def is_dir(path: Path) -> bool:
    """Whether an input path is a directory; a missing path, a symlink loop or an unreadable
    path is a ``FormatError`` naming it."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:
        raise FormatError(os_reason(exc), path=path, code=_code(exc)) from None
    except ValueError:
        raise FormatError("invalid file name", path=path) from None
