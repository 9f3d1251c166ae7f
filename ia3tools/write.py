"""Writing safetensors files: a header, then each tensor's bytes at its fixed offset, copied raw in
the kernel (untouched tensors) or produced block by block (folded and converted ones).

Errors keep their blame: a source that ends early or cannot be read is a ``FormatError`` naming
the *input* file; only failures to write (a full disk) are the output's.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ia3tools.errors import FormatError
from ia3tools.formats import files
from ia3tools.formats.files import os_reason
from ia3tools.formats.safetensors import ByteRange

_OUTPUT_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its header entry and where its bytes come from (``raw`` is copied in
    the kernel; ``chunks`` is called to produce the bytes block by block)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    raw: ByteRange | None = None
    chunks: Callable[[], Iterable[bytes]] | None = None


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
    jobs: list[tuple[int, ByteRange | OutTensor]] = []
    position = len(header)
    for run in _coalesce(tensors):
        jobs.append((position, run))
        position += run.nbytes
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    stop = threading.Event()
    try:
        _reserve(fd, position)
        _pwrite_all(fd, header, 0)
        raw_jobs = [(off, job) for off, job in jobs if isinstance(job, ByteRange)]
        computed = [(off, job) for off, job in jobs if not isinstance(job, ByteRange)]

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


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks up front, so that a full disk fails here, before any real work."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in _OUTPUT_FULL:
                raise
            # EOPNOTSUPP/EINVAL: the filesystem cannot preallocate; the writes find out instead


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = files.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing back (and then drop) these pages now, not at fsync time:
    overlaps the disk writes with the remaining work and keeps written data out of the cache."""
    if length and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _coalesce(tensors: list[OutTensor]) -> Iterator[ByteRange | OutTensor]:
    pending: ByteRange | None = None
    for t in tensors:
        if t.raw is not None:
            r = t.raw
            if pending and pending.fd == r.fd and pending.offset + pending.nbytes == r.offset:
                pending = ByteRange(r.fd, pending.offset, pending.nbytes + r.nbytes, r.path)
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


def _copy_range(src: ByteRange, dst_fd: int, dst_offset: int) -> None:
    """Copy ``src`` to ``dst_offset`` of ``dst_fd`` in the kernel (copy_file_range, which can share
    extents on reflink filesystems), falling back to pread/pwrite where unsupported or where an
    error must be pinned on one side. Positional on both sides, so several threads may copy into
    one file at once."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < src.nbytes:
        want = min(src.nbytes - done, 1 << 30)
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src.fd, dst_fd, want, src.offset + done, dst_offset + done)
            except OSError as exc:
                if exc.errno in _OUTPUT_FULL:
                    raise
                use_cfr = False  # unsupported here, or an error whose side pread/pwrite will tell
        if not use_cfr:
            chunk = read_input(src, done, min(want, 16 << 20))
            _pwrite_all(dst_fd, chunk, dst_offset + done)
            n = len(chunk)
        if n == 0:
            raise FormatError("file shrank while being read (it ends inside the tensor data)", path=src.path)
        done += n


def read_input(src: ByteRange, start: int, length: int) -> bytes:
    """Up to ``length`` bytes of ``src`` from ``start``; read errors name the input file."""
    try:
        return files.pread(src.fd, length, src.offset + start)
    except OSError as exc:
        raise FormatError(f"cannot read: {os_reason(exc)}", path=src.path) from None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".onnx", ".onnx.data")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def copy_side_files(source: Path, directory: Path, skip=()) -> list[str]:
    """Copy the files of a model directory that are not weights (config, generation config,
    tokenizer, preprocessor, README, ...) into ``directory``. Hidden files, subdirectories, an
    adapter kept beside the weights and the names in ``skip`` are left out. A side file that is not
    a regular file (a FIFO, a device) or resolves outside ``source`` (a hostile symlink) is refused,
    naming it."""
    from ia3tools.formats.checkpoint import resolve_member

    copied = []
    for entry in sorted(os.listdir(source)):
        src = source / entry
        if entry.startswith(".") or entry.endswith(WEIGHT_SUFFIXES) or entry in ADAPTER_FILES or entry in skip:
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            continue
        resolve_member(source, entry, source, what="side file")
        _copy_file(src, directory / entry)
        copied.append(entry)
    return copied


def copy_module_dirs(source: Path, directory: Path, names: list[str]) -> list[str]:
    """Copy subdirectories of ``source`` (sentence-transformers module directories such as
    ``1_Pooling``) into ``directory``, with the same rules as ``copy_side_files``: regular files
    only, nothing that resolves outside ``source``, hidden entries skipped."""
    from ia3tools.formats.checkpoint import resolve_member

    copied = []
    for name in names:
        src_root = source / name
        for root, dirs, names_here in os.walk(src_root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(root, d)))
            rel = Path(root).relative_to(source)
            (directory / rel).mkdir(parents=True, exist_ok=True)
            for entry in sorted(names_here):
                if entry.startswith("."):
                    continue
                resolve_member(Path(root), entry, Path(root), what="module file")
                _copy_file(Path(root) / entry, directory / rel / entry)
                copied.append(str(rel / entry))
    return copied


def copy_tree_or_file(source: Path, name: str, directory: Path) -> None:
    """Copy ``source/name`` (a file, or a directory of files) into ``directory``, as the side
    files are copied."""
    from ia3tools.formats.checkpoint import resolve_member

    if (source / name).is_dir() and not (source / name).is_symlink():
        copy_module_dirs(source, directory, [name])
        return
    resolve_member(source, name, source, what="side file")
    _copy_file(source / name, directory / name)


def _copy_file(src: Path, dst: Path) -> None:
    with open(dst, "xb") as out:
        for chunk in files.read_chunks(src, "side file"):
            out.write(chunk)


def write_index(path: Path, weight_map: dict[str, str], metadata: dict) -> None:
    path.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n")


def validate_checkpoint(directory: Path) -> None:
    """Re-open a written model directory as a checkpoint: index and every shard's header, fully
    validated and consistent with each other."""
    from ia3tools.formats.checkpoint import open_checkpoint

    open_checkpoint(directory).close()


def validate_adapter(directory: Path) -> None:
    """Re-open a written adapter directory: its config, keys and header."""
    from ia3tools.formats.adapter import read_adapter

    read_adapter(directory).close()
