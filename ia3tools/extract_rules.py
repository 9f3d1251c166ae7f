"""The decisions ``extract`` takes beyond the arithmetic: a checkpoint's 2-D weight layout, which
orientation a module gets when both fit, and the adapter config that names exactly the modules
found.

**Layout.** A Linear stores ``(out, in)``, GPT-2's Conv1D ``(in, out)``; the bias has ``out``
entries, so a changed module whose bias length matches only one axis says which. Such evidence,
when unanimous, decides; without it the ``model_type`` does (``CONV1D_MODEL_TYPES``); else Linear.
Evidence both ways is refused: one adapter has one ``fan_in_fan_out``.

**Ambiguous orientation.** A nearly constant vector on a weight scales its rows and its columns
alike, so both fit and either re-merges exactly; only the config differs. The order that decides:
1. modules of the same name in other layers (``model.layers.*.mlp.down_proj``) that fitted one way
   only, when they all agree;
2. else PEFT's default feed-forward module names for the ``model_type`` (``FEEDFORWARD_NAMES``,
   PEFT's ``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``);
3. else scaling the outputs (not feed-forward), and a warning says so.
"""

from __future__ import annotations

import re

from ia3tools.commands.inspect import group_name
from ia3tools.errors import ExtractError, Notice
from ia3tools.formats.adapter import ModuleNames
from ia3tools.tasks import task_of_architecture

CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

# PEFT's default IA3 feed-forward modules per model_type (peft.utils.constants), as data
FEEDFORWARD_NAMES: dict[str, tuple[str, ...]] = {
    "t5": ("wo",), "mt5": (), "gpt2": ("mlp.c_proj",), "bloom": ("mlp.dense_4h_to_h",), "roberta": ("output.dense",),
    "opt": ("fc2",), "gptj": ("fc_out",), "gpt_neox": ("dense_4h_to_h",), "gpt_neo": ("c_proj",), "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",), "llama": ("down_proj",), "llama4": ("down_proj",), "mistral": ("down_proj",),
    "mixtral": ("w2",), "bert": ("output.dense",), "deberta-v2": ("output.dense",), "deberta": ("output.dense",),
    "RefinedWeb": ("dense_4h_to_h",), "RefinedWebModel": ("dense_4h_to_h",), "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",), "gemma": ("down_proj",), "gemma2": ("down_proj",), "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",), "qwen3": ("down_proj",),
}  # fmt: skip


def choose_layout(model_type: str | None, base, by_module: dict[str, list[str]], reader_of) -> str:
    """``conv1d`` or ``linear`` for the checkpoint's 2-D weights (see the module docstring)."""
    said: dict[str, str] = {}
    for module in by_module:
        weight, bias = base.tensors.get(f"{module}.weight"), base.tensors.get(f"{module}.bias")
        if weight is None or bias is None or len(weight.shape) != 2 or len(bias.shape) != 1:
            continue
        rows, cols = weight.shape
        if bias.shape[0] == cols != rows:
            said.setdefault("conv1d", module)
        elif bias.shape[0] == rows != cols:
            said.setdefault("linear", module)
    if len(said) == 2:
        raise ExtractError(f"2-D weights are stored both ways: {said['linear']} as a Linear (out, in), "
                           f"{said['conv1d']} as a Conv1D (in, out); one adapter has one fan_in_fan_out",
                           path=reader_of(f"{said['conv1d']}.weight").path, tensor=f"{said['conv1d']}.weight")
    if said:
        return next(iter(said))
    return "conv1d" if model_type in CONV1D_MODEL_TYPES else "linear"


def resolve(fits: list, model_type: str | None) -> list[Notice]:
    """Leave each fit one orientation, in the documented order; a warning when the fixed rule
    decided any."""
    groups: dict[str, set[bool]] = {}
    for f in fits:
        if len(f.vectors) == 1:
            groups.setdefault(group_name(f.module), set()).update(f.vectors)
    by_rule = []
    for f in fits:
        if len(f.vectors) == 1:
            continue
        others = groups.get(group_name(f.module), set())
        if len(others) == 1:
            choice, f.decided_by = next(iter(others)), "other-layers"
        elif model_type in FEEDFORWARD_NAMES:
            choice, f.decided_by = any(f.module.endswith(n) for n in FEEDFORWARD_NAMES[model_type]), "model-type"
        else:
            choice, f.decided_by = False, "rule"
            by_rule.append(f.module)
        f.vectors = {choice: f.vectors[choice]}
    if not by_rule:
        return []
    return [Notice("orientation-by-rule", f"{len(by_rule)} modules (e.g. {by_rule[0]}) fit both orientations and "
                   "nothing else decides: written as scaling their outputs (either re-merges exactly)")]


def _prefixes(modules) -> set[str]:
    """Every module name PEFT may see: the checkpoint's modules and their parents."""
    out = set()
    for name in modules:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _exact(names: list[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _spec(chosen: list[str], among, rule: str) -> list[str] | str:
    """``chosen`` as a list where PEFT's list rule matches exactly them among ``among``, else as a
    regex that matches nothing else."""
    names = ModuleNames(chosen, rule)
    wanted = set(chosen)
    if all(names(m) == (m in wanted) for m in among):
        return chosen
    return _exact(chosen)


def adapter_config(fits: list, heads: list[str], modules, arch: str, base_name: str) -> dict:
    """PEFT's ``adapter_config.json`` naming exactly the extracted modules."""
    targets = sorted(f.module for f in fits)
    feedforward = sorted(f.module for f in fits if next(iter(f.vectors)))
    task = task_of_architecture(arch) if arch else None
    return {  # the keys PEFT's IA3Config saves (but peft_version: PEFT did not write this)
        "auto_mapping": None,
        "peft_type": "IA3",
        "task_type": task.peft if task else None,
        "base_model_name_or_path": base_name,
        "revision": None,
        "target_modules": _spec(targets, _prefixes(modules), "dot"),
        "feedforward_modules": _spec(feedforward, targets, "plain"),
        "exclude_modules": None,
        "fan_in_fan_out": any(f.layer == "conv1d" for f in fits),
        "modules_to_save": sorted(heads) or None,
        "init_ia3_weights": True,
        "inference_mode": True,
    }
