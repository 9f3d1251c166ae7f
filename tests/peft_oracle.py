"""The reference: load a saved base + adapter with transformers and PEFT, as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_peft(base_dir: Path, adapter_dir: Path, task_cls: str | None = None, dtype=None):
    """The PEFT model for a saved pair. ``task_cls`` overrides the config's architecture (the
    bare-backbone fixture is loaded under the task head its adapter was trained with)."""
    import transformers
    from peft import PeftModel

    if (base_dir / "config.json").exists():
        arch = task_cls or json.loads((base_dir / "config.json").read_text())["architectures"][0]
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = getattr(transformers, arch).from_pretrained(base_dir, **kwargs)
    else:  # a plain torch model saved as a state dict (the grouped-conv net)
        import sys

        from safetensors.torch import load_file

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
        from tiny import GroupedConvNet

        model = GroupedConvNet()
        model.load_state_dict(load_file(base_dir / "model.safetensors"))
        if dtype is not None:
            model = model.to(dtype)
    return PeftModel.from_pretrained(model.eval(), adapter_dir).eval()


def ia3_layers(peft_model):
    """(module name in the adapter's namespace, layer) for every IA3 layer."""
    from peft.tuners.ia3 import IA3Layer

    prefix = "base_model.model."
    return [(name[len(prefix):], m) for name, m in peft_model.named_modules() if isinstance(m, IA3Layer)]


def peft_scaling(layer) -> torch.Tensor:
    """The tensor PEFT multiplies the weight by when merging, broadcast to the weight's shape."""
    from peft.utils import transpose

    weight = layer.get_base_layer().weight
    vector = layer.ia3_l["default"].data
    if hasattr(layer, "_get_ia3_scaling_for_weight"):
        scaling = layer._get_ia3_scaling_for_weight(vector)
    else:
        scaling = transpose(vector, layer.fan_in_fan_out)
    return torch.broadcast_to(scaling, weight.shape)
