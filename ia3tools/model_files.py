"""The files around a merged model's tensors: what its ``config.json`` must say so that transformers
loads exactly what was written (the task head a bare backbone gained, the dtype ``--dtype`` wrote,
a vocabulary the adapter resized), and whose tokenizer it ships. Decided before anything is
written, so a problem is found early."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ia3tools.errors import AdapterError, FormatError, OptionError, PlanError
from ia3tools.formats.config import CONFIG_NAME, architecture
from ia3tools.tasks import task_of_peft

TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# what transformers saves for a tokenizer (and TRL for a chat template)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
TOKENIZER_DIRS = ("additional_chat_templates",)


def merged_config(base: Path, config: dict | None, adapter, plan, added_shapes: list[tuple[int, ...]],
                  dtype: str | None, vocab: int | None) -> dict | None:
    """The merged model's config.json, or None when the base's serves unchanged.

    - A bare backbone that gains a task head names the task model (``AutoModelFor<Task>`` then
      loads every weight), with label maps sized to the head (``added_shapes``).
    - ``dtype`` (a safetensors name) becomes the config's ``dtype``, and ``torch_dtype`` too where
      the config (or a sub-config) uses that key: from_pretrained(dtype="auto") loads what was written.
    - ``vocab``: the vocabulary size the adapter's resized embeddings have.
    """
    if config is None or not (plan.names.rename_output or dtype or vocab):
        return None
    config = dict(config)
    if plan.names.rename_output:
        _retarget(base, config, adapter, added_shapes)
    if dtype:
        _set_dtype(config, TORCH_NAMES[dtype])
    if vocab:
        config["vocab_size"] = vocab
    return config


def _retarget(base: Path, config: dict, adapter, added_shapes) -> None:
    task_type = adapter.config.task_type
    task = task_of_peft(task_type)
    if task is None or task.head is None:
        raise AdapterError(f"the adapter adds head tensors but its task_type {task_type!r} names no "
                           "transformers task", path=adapter.config.path)
    arch = architecture(config)
    stem = arch[: -len("Model")] if arch.endswith("Model") else arch
    if not stem:
        raise FormatError("config names no architecture to derive the task model from", path=base / CONFIG_NAME)
    config["architectures"] = [stem + task.head]
    if task.peft in ("SEQ_CLS", "TOKEN_CLS"):
        matrices = [shape for shape in added_shapes if len(shape) == 2]
        if matrices:
            labels = matrices[0][0]
            if len(config.get("id2label") or {}) != labels:
                config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
                config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}


def _set_dtype(config: dict, name: str) -> None:
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    for value in config.values():  # sub-configs (text_config, vision_config, ...) carry their own
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            _set_dtype(value, name)


@dataclass(frozen=True)
class TokenizerChoice:
    source: str | None  # "adapter", "base", or None when neither has a tokenizer
    directory: Path | None  # where its files are copied from
    files: tuple[str, ...]  # tokenizer files (and directories) it has


def tokenizer_files(directory: Path) -> tuple[str, ...]:
    return tuple(n for n in TOKENIZER_FILES + TOKENIZER_DIRS if os.path.lexists(Path(directory) / n))


def choose_tokenizer(base_dir: Path | None, adapter_dir: Path, wanted: str | None) -> TokenizerChoice:
    """The adapter's tokenizer (and chat template) when it carries one, since the model was trained
    with it; else the base's. ``wanted`` ("base" or "adapter") overrides."""
    if wanted not in (None, "base", "adapter"):
        raise OptionError(f"tokenizer_from {wanted!r}: expected base or adapter")
    own = tokenizer_files(adapter_dir)
    if wanted == "adapter" and not own:
        raise AdapterError("--tokenizer-from adapter, but the adapter directory holds no tokenizer files",
                           path=adapter_dir)
    if own and wanted != "base":
        return TokenizerChoice("adapter", adapter_dir, own)
    base_files = tokenizer_files(base_dir) if base_dir is not None else ()
    return TokenizerChoice("base" if base_files else None, base_dir if base_files else None, base_files)


def resized_vocab(plan, vocab_size: int | None, base_tensors) -> int | None:
    """The vocabulary size modules_to_save resizes the embeddings to (None when it does not), after
    checking that every vocabulary-sized matrix of the base is resized alike."""
    resized = [h for h in plan.heads if h.replaces and h.shape[0] != base_tensors[h.replaces].shape[0]]
    if not resized:
        return None
    sizes = sorted({h.shape[0] for h in resized})
    if len(sizes) > 1:
        raise PlanError(f"modules_to_save resizes the vocabulary to different sizes: {sizes}")
    replaced = {h.replaces for h in resized}
    left = [n for n, ref in base_tensors.items() if len(ref.shape) == 2 and ref.shape[0] == vocab_size
            and n not in replaced]
    if left:
        raise PlanError(f"modules_to_save resizes the vocabulary to {sizes[0]} rows but leaves {left[0]} at "
                        f"{vocab_size}")
    return sizes[0]




def write_model_files(base_root: Path, weights_dir: Path, weights_out: Path, out_root: Path, sentence,
                      tokenizer: TokenizerChoice, config: dict | None, card: str) -> None:
    """Everything of the merged directory but the weights: the base's side files (its tokenizer
    unless the adapter's is taken), the chosen tokenizer, the sentence-transformers modules and side
    files, the rewritten config, and the model card (which replaces the base's)."""
    import json

    from ia3tools.write import copy_module_dirs, copy_side_files, copy_tree_or_file

    skip = {"README.md"} | (set(TOKENIZER_FILES) if tokenizer.source == "adapter" else set())
    if weights_dir.is_dir():
        copy_side_files(weights_dir, weights_out, skip=skip)
    if tokenizer.source == "adapter":
        for name in tokenizer.files:
            copy_tree_or_file(tokenizer.directory, name, weights_out)
    if sentence is not None:
        if weights_dir != base_root:
            copy_side_files(base_root, out_root, skip={"README.md"})
        copy_module_dirs(base_root, out_root, [d for d in sentence.module_dirs if base_root / d != weights_dir])
    if config is not None:
        (weights_out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_root / "README.md").write_text(card)
