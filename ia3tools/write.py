"""Writing model directories atomically.

Everything is written into a staging directory beside the output (same filesystem, so the final
``rename`` is atomic), fsynced, re-opened and validated, and only then renamed into place. A
process killed midway leaves only a hidden ``.<name>.ia3tools-staging-<pid>-<token>`` directory,
never something at the output path that looks complete; the next run removes stale ones.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ia3tools.errors import OutputError

STAGING_MARK = ".ia3tools-staging-"


@dataclass(frozen=True)
class RawSource:
    """Bytes copied verbatim from an open file (never decoded)."""

    fd: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its header entry and where its bytes come from (``raw`` is copied in
    the kernel; ``chunks`` is called to produce the bytes block by block)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    raw: RawSource | None = None
    chunks: Callable[[], Iterable[bytes]] | None = None


def check_output_path(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an output equal to, inside, or containing an input; refuse an existing one unless forced."""
    real_out = out.resolve()
    for inp in inputs:
        real_in = Path(inp).resolve()
        if real_out == real_in or real_in in real_out.parents:
            raise OutputError(f"output is inside the input {inp}", path=out)
        if real_out in real_in.parents:
            raise OutputError(f"output would contain the input {inp}", path=out)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError("output already exists (use --force to replace it)", path=out)
        if not out.is_dir() or out.is_symlink():
            raise OutputError("output exists and is not a directory; refusing to replace it", path=out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{parent} is not a directory", path=out)
            break


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging directories for ``out`` left by processes that no longer run."""
    removed = []
    prefix = f".{out.name}{STAGING_MARK}"
    for entry in out.parent.iterdir() if out.parent.exists() else []:
        if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
            pid_text = entry.name[len(prefix):].split("-")[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


class Staging:
    """A staging directory that becomes ``out`` on ``publish()`` and vanishes on any failure."""

    def __init__(self, out: Path, force: bool = False, durable: bool = True):
        self.out = out
        self.force = force
        self.durable = durable  # fsync before the rename: the output survives a power loss
        self.path = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"

    def __enter__(self) -> "Staging":
        # Create missing parents of the output (and remember them, to remove them on failure).
        self.created = [p for p in reversed(self.out.parents) if not p.exists()]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.out)
        self.path.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None:
            for parent in reversed(self.created):
                try:
                    parent.rmdir()
                except OSError:
                    break
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise _os_error(exc, self.out) from None
        return False

    def publish(self, validate: Callable[[Path], None] | None = None) -> None:
        """fsync every file and the directory, validate (``validate_directory`` by default), then
        rename into place atomically."""
        if self.durable:
            for f in self.path.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(self.path)
        (validate or validate_directory)(self.path)
        if self.out.exists() and _exchange(self.path, self.out):
            # --force: one atomic swap; the old output now sits in the staging path.
            if self.durable:
                _fsync_dir(self.out.parent)
            shutil.rmtree(self.path, ignore_errors=True)
            return
        trash = None
        if self.out.exists():  # no atomic exchange here: move the old output aside, swap, drop it
            trash = self.out.parent / f".{self.out.name}{STAGING_MARK}{os.getpid()}-old-{secrets.token_hex(4)}"
            os.rename(self.out, trash)
        try:
            os.rename(self.path, self.out)
        except OSError:
            if trash is not None:
                os.rename(trash, self.out)
            raise
        if self.durable:
            _fsync_dir(self.out.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: OSError, out: Path) -> OutputError:
    reason = {errno.ENOSPC: "disk full", errno.EFBIG: "file size limit reached", errno.EDQUOT: "disk quota exceeded"}
    why = reason.get(exc.errno, exc.strerror or str(exc))
    return OutputError(f"cannot write the output: {why}; nothing was written", path=out)


def build_header(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    doc: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str], progress=None,
                      workers: int = 2, durable: bool = True) -> None:
    """Write one safetensors file. Every tensor's offset is fixed by the header, so the raw runs
    (copied in the kernel) and the computed tensors (folded block by block) are written at their
    offsets concurrently, by ``workers`` threads. Written ranges are handed to the kernel for
    writeback at once (when ``durable``), so the final fsync has little left to wait for."""
    header = build_header(tensors, metadata)
    jobs: list[tuple[int, RawSource | OutTensor]] = []
    position = len(header)
    for run in _coalesce(tensors):
        jobs.append((position, run))
        position += run.nbytes
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    stop = threading.Event()
    try:
        if position:
            os.posix_fallocate(fd, 0, position)  # a full disk fails here, before any real work
        _pwrite_all(fd, header, 0)
        raw_jobs = [(off, job) for off, job in jobs if isinstance(job, RawSource)]
        computed = [(off, job) for off, job in jobs if not isinstance(job, RawSource)]

        def copy_raw():
            for offset, src in raw_jobs:
                if stop.is_set():
                    return
                _copy_range(src, fd, offset)
                if durable:
                    _start_writeback(fd, offset, src.nbytes)
                if progress:
                    progress(src.nbytes)

        def write_computed(offset: int, tensor: OutTensor):
            start = offset
            for chunk in tensor.chunks():
                if stop.is_set():
                    return
                _pwrite_all(fd, chunk, offset)
                offset += len(chunk)
                if progress:
                    progress(len(chunk))
            if durable:
                _start_writeback(fd, start, offset - start)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(copy_raw)] + [pool.submit(write_computed, off, t) for off, t in computed]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing back (and then drop) these pages now, not at fsync time:
    overlaps the disk writes with the remaining work and keeps written data out of the cache."""
    if length and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _coalesce(tensors: list[OutTensor]) -> Iterator[RawSource | OutTensor]:
    pending: RawSource | None = None
    for t in tensors:
        if t.raw is not None:
            r = t.raw
            if pending and pending.fd == r.fd and pending.offset + pending.nbytes == r.offset:
                pending = RawSource(r.fd, pending.offset, pending.nbytes + r.nbytes)
                continue
            if pending:
                yield pending
            pending = r
        else:
            if pending:
                yield pending
                pending = None
            yield t
    if pending:
        yield pending


def _copy_range(src: RawSource, dst_fd: int, dst_offset: int) -> None:
    """Copy ``src`` to ``dst_offset`` of ``dst_fd`` in the kernel (copy_file_range, which can share
    extents on reflink filesystems), falling back to pread/pwrite where unsupported. Positional on
    both sides, so several threads may copy into one file at once."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < src.nbytes:
        want = min(src.nbytes - done, 1 << 30)
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src.fd, dst_fd, want, src.offset + done, dst_offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
        if not use_cfr:
            chunk = os.pread(src.fd, min(want, 16 << 20), src.offset + done)
            if not chunk:
                raise OSError(errno.EIO, "source file ended early")
            _pwrite_all(dst_fd, chunk, dst_offset + done)
            n = len(chunk)
        if n == 0:
            raise OSError(errno.EIO, "source file ended early")
        done += n


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".onnx", ".onnx.data")


def copy_side_files(source: Path, directory: Path) -> list[str]:
    """Copy the files of a model directory that are not weights (config, generation config,
    tokenizer, preprocessor, README, ...) into ``directory``. Hidden files and subdirectories are
    skipped; a file that resolves outside ``source`` (a hostile symlink) is refused."""
    from ia3tools.formats.checkpoint import resolve_member

    copied = []
    for entry in sorted(os.listdir(source)):
        src = source / entry
        if entry.startswith(".") or entry.endswith(WEIGHT_SUFFIXES) or not src.is_file():
            continue
        resolve_member(source, entry, source, what="side file")
        shutil.copyfile(src, directory / entry)
        copied.append(entry)
    return copied


def write_index(path: Path, weight_map: dict[str, str], metadata: dict) -> None:
    path.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")


def validate_directory(directory: Path) -> None:
    """Re-open the written directory as what it is: an adapter (config, keys, header) or a
    checkpoint (index and every shard's header, fully validated, consistent with each other)."""
    from ia3tools.formats.adapter import CONFIG_NAME, read_adapter
    from ia3tools.formats.checkpoint import open_checkpoint

    opened = read_adapter(directory) if (directory / CONFIG_NAME).exists() else open_checkpoint(directory)
    opened.close()
