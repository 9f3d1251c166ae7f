"""The merged model's ``config.json``: what must change in the base's so that transformers loads
exactly what was written. Computed before anything is written, so a problem is found early."""

from __future__ import annotations

from pathlib import Path

from ia3tools.errors import AdapterError, FormatError
from ia3tools.formats.config import CONFIG_NAME, architecture
from ia3tools.tasks import task_of_peft


def retargeted_config(base: Path, config: dict | None, adapter, plan, added_shapes: list[tuple[int, ...]]) -> dict | None:
    """A bare backbone that gains a task head: config.json must name the task model, so that
    ``AutoModelFor<Task>.from_pretrained`` loads every weight, with label maps sized to the head
    (``added_shapes``: the shapes of the added head tensors). None when nothing changes."""
    if not plan.names.rename_output or config is None:
        return None
    task_type = adapter.config.task_type
    task = task_of_peft(task_type)
    if task is None or task.head is None:
        raise AdapterError(f"the adapter adds head tensors but its task_type {task_type!r} names no "
                           "transformers task", path=adapter.config.path)
    arch = architecture(config)
    stem = arch[: -len("Model")] if arch.endswith("Model") else arch
    if not stem:
        raise FormatError("config names no architecture to derive the task model from", path=base / CONFIG_NAME)
    config = dict(config, architectures=[stem + task.head])
    if task.peft in ("SEQ_CLS", "TOKEN_CLS"):
        matrices = [shape for shape in added_shapes if len(shape) == 2]
        if matrices:
            labels = matrices[0][0]
            if len(config.get("id2label") or {}) != labels:
                config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
                config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return config
