"""Loading a model directory with transformers for export: exactly the weights in the directory, in
float32, with every hub access forbidden, and the inputs its tokenizer gives.

The weights are read by ia3tools' own reader (``pread``, never a memory map) straight into the
float32 tensors the model keeps: loading through transformers' memory map would hold the file's
pages as well as the upcast tensors, and peak at about 1.6x the model. An adapter kept beside the
weights is never shown to transformers, which would re-apply it."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from pathlib import Path

from ia3tools.errors import ExportError, require
from ia3tools.formats import open_checkpoint
from ia3tools.formats.dtypes import to_torch
from ia3tools.formats.hub import offline
from ia3tools.tasks import Task
from ia3tools.write import ADAPTER_FILES

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # graph input order
_CHUNK = 16 << 20


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


def _transformers():
    with offline():  # before transformers is first imported: huggingface_hub reads these at import
        torch = require("torch", "onnx", "export-onnx")
        transformers = require("transformers", "onnx", "export-onnx")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return torch, transformers


def read_state_dict(directory: Path) -> dict:
    """Every tensor of the checkpoint in ``directory`` as a torch tensor (floating ones in
    float32), read straight into its own buffer and upcast once."""
    import torch

    state = {}
    staging = torch.empty(_CHUNK, dtype=torch.uint8)  # one buffer for the bytes of every upcast tensor
    with contextlib.closing(open_checkpoint(directory)) as ckpt:
        for name, ref in ckpt.tensors.items():
            dtype = to_torch(ref.dtype)
            if not dtype.is_floating_point or dtype in (torch.float32, torch.float64):
                tensor = torch.empty(ref.nbytes, dtype=torch.uint8)
                ckpt.read_into(name, tensor.numpy())
                state[name] = tensor.view(dtype).reshape(ref.shape)
                continue
            out = torch.empty(ref.shape, dtype=torch.float32)
            flat, size = out.view(-1), torch.empty((), dtype=dtype).element_size()
            for start in range(0, ref.nbytes, _CHUNK):  # read and upcast in chunks, never the whole tensor twice
                n = min(_CHUNK, ref.nbytes - start)
                ckpt.read_into(name, staging[:n].numpy(), start)
                flat[start // size:(start + n) // size].copy_(staging[:n].view(dtype))
            state[name] = out
    return state


def load_model(view: Path, source: Path, task: Task, shown: Path):
    """The task's transformers model: its config from ``view`` (a directory holding only the
    weights and side files of ``source``), its weights from ``source``, in float32 and eval mode.
    Every parameter must come from the checkpoint; errors name ``shown``."""
    torch, transformers = _transformers()
    kwargs = {"dtype": torch.float32}
    if task.inputs != "image":
        kwargs["attn_implementation"] = "eager"  # sdpa breaks the T5 export under dynamo
    auto = getattr(transformers, task.auto_class)
    try:
        with offline():
            config = transformers.AutoConfig.from_pretrained(view, local_files_only=True)
            cls = auto._model_mapping[type(config)]  # the concrete class: Auto classes refuse a state dict
            model, info = cls.from_pretrained(None, config=config, state_dict=read_state_dict(source),
                                              output_loading_info=True, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"transformers cannot load it as {task.auto_class}: {_first_line(exc)}", path=shown) from None
    missing = [k for k in info.get("missing_keys", []) if k not in _tied(model)]
    if missing or info.get("mismatched_keys"):
        what = missing or [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
        raise ExportError(f"the checkpoint does not hold every weight {cls.__name__} needs: {', '.join(what[:3])}"
                          + (f" and {len(what) - 3} more" if len(what) > 3 else ""), path=shown)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def _tied(model) -> set[str]:
    """Parameter names that share their tensor with another parameter (tied embeddings)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update((name, seen[id(p)]))
        seen.setdefault(id(p), name)
    return tied


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def text_input_names(model, model_dir: Path) -> tuple[list[str], str]:
    """The inputs a text model's graph takes, and where that came from: what the saved tokenizer
    produces (its ``model_input_names``) that the model's forward accepts; without a tokenizer,
    ``input_ids`` and ``attention_mask``, and ``token_type_ids`` where the architecture has
    segment embeddings (``type_vocab_size`` > 1)."""
    accepted = set(inspect.signature(model.forward).parameters)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is not None:
        produced = set(tokenizer.model_input_names)
        names = [n for n in TEXT_INPUTS if n in produced and n in accepted]
        if "input_ids" in names:
            return names, "the tokenizer"
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names, "the architecture"


def load_tokenizer(model_dir: Path):
    """The tokenizer saved in ``model_dir``, or None when there is none."""
    if not any((model_dir / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                   "tokenizer.model", "spiece.model", "vocab.json")):
        return None
    _, transformers = _transformers()
    try:
        with offline():
            return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # an unloadable tokenizer: fall back to what the architecture uses
        return None
