"""Filesystem primitives publishing is built on: renames that never replace, atomic exchanges, and
exclusive locks held by an open descriptor. Each says plainly where the platform lacks it."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import sys
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _libc():
    if sys.platform == "win32":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def rename_call(name: str, a: Path, b: Path, flags: int) -> bool | None:
    """Call renameat2/renamex_np; True on success, None where the call or flag is unsupported."""
    func = getattr(_libc(), name, None)
    if func is None:
        return None
    if name == "renameat2":
        rc = func(-100, os.fsencode(a), -100, os.fsencode(b), flags)  # -100: AT_FDCWD
    else:
        rc = func(os.fsencode(a), os.fsencode(b), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return None
    raise OSError(err, os.strerror(err), str(b))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` when ``dst`` exists, which is never replaced."""
    if sys.platform == "win32":
        os.rename(src, dst)  # never replaces on Windows
        return
    call = ("renameat2", 1) if sys.platform.startswith("linux") else ("renamex_np", 4)  # NOREPLACE / EXCL
    try:
        if rename_call(call[0], src, dst, call[1]):
            return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    # No atomic no-replace here (old kernel, some filesystems): check, then rename. A plain rename
    # replaces only an *empty* directory, so the window can lose nothing but an empty directory.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the platform or filesystem cannot."""
    if sys.platform.startswith("linux"):
        return bool(rename_call("renameat2", a, b, 2))  # RENAME_EXCHANGE
    if sys.platform == "darwin":
        return bool(rename_call("renamex_np", a, b, 2))  # RENAME_SWAP
    return False


class Lock:
    """An exclusive lock held through an open descriptor of a lock file."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    @classmethod
    def create(cls, path: Path) -> "Lock":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        if not cls._try_lock(fd):
            os.close(fd)
            raise OSError(errno.EAGAIN, "cannot lock a new lock file", str(path))
        return cls(path, fd)

    @classmethod
    def take_over(cls, path: Path) -> "Lock | None":
        """The lock of a leftover whose owner is gone; None while its owner still holds it."""
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            try:
                return cls.create(path)  # the owner died before creating it, or after removing it
            except OSError:
                return None
        except OSError:
            return None
        if not cls._try_lock(fd):
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if not same:  # another run finished with this leftover and removed its lock meanwhile
            os.close(fd)
            return None
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (on Windows, the other way round)."""
        if sys.platform != "win32":
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        if sys.platform == "win32":
            with contextlib.suppress(OSError):
                os.unlink(self.path)
