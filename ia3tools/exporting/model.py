"""Loading a model directory with transformers for export: exactly the weights in the directory
(an adapter kept beside them is hidden from transformers, which would re-apply it), in float32,
with every hub access forbidden."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ia3tools.errors import ExportError, require
from ia3tools.tasks import Task
from ia3tools.write import ADAPTER_FILES


@contextlib.contextmanager
def offline():
    """Forbid every hub access while transformers runs (``local_files_only`` is passed as well)."""
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


def weights_view(source: Path, view: Path) -> Path:
    """A directory of links to ``source``'s files without its adapter files: transformers
    re-applies an adapter it finds beside the weights (and fetches the base an adapter names), so
    it is only ever shown the weights and side files."""
    view.mkdir()
    for entry in sorted(os.listdir(source)):
        src = source / entry
        if entry.startswith(".") or entry in ADAPTER_FILES or not os.path.isfile(src):
            continue
        target = os.path.realpath(src)
        try:
            os.symlink(target, view / entry)
        except OSError:  # no symlinks here (Windows without the privilege): a hard link, else a copy
            try:
                os.link(target, view / entry)
            except OSError:
                shutil.copyfile(target, view / entry)
    return view


def load_model(model_dir: Path, task: Task, shown: Path):
    with offline():  # before transformers is first imported: huggingface_hub reads these at import
        torch = require("torch", "onnx", "export-onnx")
        transformers = require("transformers", "onnx", "export-onnx")

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cls = getattr(transformers, task.auto_class)
    kwargs = {"dtype": torch.float32, "local_files_only": True}
    if task.inputs != "image":
        kwargs["attn_implementation"] = "eager"  # sdpa breaks the T5 export under dynamo
    try:
        with offline():
            model = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"transformers cannot load it as {task.auto_class}: {str(exc).splitlines()[0]}",
                          path=shown) from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()
