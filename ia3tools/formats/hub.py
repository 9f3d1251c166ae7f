"""Naming a base model as transformers and PEFT let one: a local directory, a hub id ``org/name``
(optionally ``org/name@revision``) found in the local Hugging Face cache, a cache directory
``models--org--name``, or nothing at all, when the adapter's ``base_model_name_or_path`` names one
of those. Resolved with huggingface_hub's own cache lookup, with every download forbidden: a model
that is not in the cache is a one-line error naming the id and where it was looked for."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ia3tools.errors import FormatError

_CACHE_DIR = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)")
_HUB_ID = re.compile(r"(?P<id>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class ModelLocation:
    path: Path  # a local directory (or weights file) to read
    hub_id: str | None = None  # org/name when the model is known by one
    revision: str | None = None


@contextlib.contextmanager
def offline():
    """Forbid every hub access while huggingface_hub or transformers runs."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: "1" for n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def hub_cache_dir() -> Path:
    """The cache huggingface_hub and transformers read: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (read at each call, so that a changed environment counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def locate(spec: str | os.PathLike, what: str = "base") -> ModelLocation:
    """Where the model named by ``spec`` is on this machine (see the module docstring)."""
    text = os.fspath(spec)
    path = Path(text)
    if os.path.lexists(path):
        cached = _CACHE_DIR.fullmatch(path.name)
        if cached and path.is_dir():  # a cache directory: its main ref's snapshot
            return _from_cache(f"{cached['org']}/{cached['name']}", None, what, cache=path.parent)
        try:
            parts = path.resolve().parts
        except (OSError, RuntimeError):  # a symlink loop: reading it says so
            return ModelLocation(path)
        for i in range(len(parts) - 2):  # a snapshot inside a cache: models--org--name/snapshots/<commit>
            cached = _CACHE_DIR.fullmatch(parts[i])
            if cached and parts[i + 1] == "snapshots":
                return ModelLocation(path, f"{cached['org']}/{cached['name']}", parts[i + 2])
        return ModelLocation(path)
    hub = _HUB_ID.fullmatch(text)
    if hub and not text.startswith((".", "/", "~")):
        return _from_cache(hub["id"], hub["revision"], what)
    raise FormatError("no such file or directory (nor a hub id org/name)", path=text, code="not-found")


def _from_cache(repo_id: str, revision: str | None, what: str, cache: Path | None = None) -> ModelLocation:
    import huggingface_hub

    cache = cache or hub_cache_dir()
    try:
        with offline():
            snapshot = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...: all "not there"
        shown = f"{repo_id}@{revision}" if revision else repo_id
        why = "an invalid hub id" if type(exc).__name__ == "HFValidationError" else "not in the local Hugging Face cache"
        raise FormatError(f"{what} {shown} is {why} (looked in {cache}); ia3tools never downloads: fetch it first "
                          f"with `hf download {repo_id}`", path=shown, code="not-found") from None
    return ModelLocation(Path(snapshot), repo_id, revision)


def base_of(adapter_config, what: str = "base") -> ModelLocation:
    """The base an adapter names (``base_model_name_or_path``), as PEFT's AutoPeftModel finds it."""
    named = adapter_config.base_model_name_or_path
    if not named:
        raise FormatError("no base model given, and the adapter's base_model_name_or_path names none",
                          path=adapter_config.path, code="not-found")
    try:
        return locate(named, what)
    except FormatError as exc:
        raise FormatError(f"base_model_name_or_path {named!r}: {exc.message}", path=adapter_config.path,
                          code=exc.code) from None
