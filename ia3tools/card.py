"""Model cards: the README.md ia3tools writes into what it makes, with YAML front matter in the
Hub's model-card metadata conventions (rendered by huggingface_hub's ``ModelCardData``).

- a merge is a fine-tune of its base (``base_model_relation: finetune``): the adapter's training
  changed the base's weights;
- a blend is an adapter (``adapter``) of the base its inputs name;
- an export is the same model in another format: no relation (the Hub has none for conversions),
  unless an adapter was merged on the way (``finetune``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ia3tools import __version__

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_card_metadata(directory: Path) -> dict:
    """The YAML metadata of ``directory/README.md``; {} when there is none or it cannot be read
    (a card is documentation: a broken one never stops a merge)."""
    path = Path(directory) / "README.md"
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import metadata_load

        return metadata_load(path) or {}
    except Exception:  # malformed YAML, unreadable file: no metadata
        return {}


def base_model_id(hub_id: str | None, adapter_base: str | None, base_card: dict, base_dir: Path) -> str:
    """The base's hub id when known (its cache path, the adapter's base_model_name_or_path, its own
    card), else the base directory's name."""
    if hub_id:
        return hub_id
    if adapter_base and _HUB_ID.fullmatch(adapter_base) and not os.path.exists(adapter_base):
        return adapter_base
    named = base_card.get("model_name") or base_card.get("model_id")
    if isinstance(named, str) and _HUB_ID.fullmatch(named):
        return named
    return Path(base_dir).resolve().name


def _link(model: str) -> str:
    """A hub id as a link to its page; anything else as code."""
    return f"[{model}](https://huggingface.co/{model})" if _HUB_ID.fullmatch(model) else f"`{model}`"


def _render(data: dict, body: str) -> str:
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], "")}).to_yaml()
    return f"---\n{metadata}\n---\n\n{body.strip()}\n"


def _tags(*extra: str) -> list[str]:
    return ["ia3", "ia3tools", *extra]


def merge_card(*, name: str, base_id: str, base_card: dict, adapter: str, adapter_sha256: str, library: str,
               command: str, dtype: str, tokenizer_from: str | None) -> str:
    data = {"base_model": base_id, "base_model_relation": "finetune", "library_name": library,
            "license": base_card.get("license"), "tags": _tags("merge")}
    lines = [
        f"# {name}",
        "",
        f"{_link(base_id)} with the IA3 adapter `{adapter}` merged into its weights "
        f"by ia3tools {__version__}: bit for bit what PEFT's `merge_and_unload` gives, loadable without PEFT.",
        "",
        f"- Base model: `{base_id}`",
        f"- Adapter: `{adapter}` (adapter_model sha256 `{adapter_sha256}`)",
        f"- Weights: {'kept in their dtypes' if dtype == 'kept' else dtype}; tokenizer: "
        f"{'from the adapter' if tokenizer_from == 'adapter' else 'from the base' if tokenizer_from else 'none'}",
        f"- Made by: `{command}`",
        "",
        f"Prove it: `ia3tools verify BASE ADAPTER {name}` recomputes every tensor and compares it bit for bit.",
    ]
    return _render(data, "\n".join(lines))


def blend_card(*, name: str, base_id: str | None, sources: list, method: str, missing: str, command: str) -> str:
    data = {"base_model": base_id, "base_model_relation": "adapter" if base_id else None, "library_name": "peft",
            "tags": _tags("blend")}
    rows = "\n".join(f"| `{s.path}` | {s.weight:g} | `{s.sha256}` |" for s in sources)
    lines = [
        f"# {name}",
        "",
        f"An IA3 adapter blended from {len(sources)} adapters by ia3tools {__version__} "
        f"(`{method}`; a module some adapters lack counts as `{missing}`).",
        "",
        "| adapter | weight | adapter_model sha256 |",
        "|---|---|---|",
        rows,
        "",
        f"Made by: `{command}`",
    ]
    return _render(data, "\n".join(lines))


def export_card(*, name: str, base_id: str, relation: str | None, task: str, inputs: list[str], outputs: list[str],
                parity: str, command: str) -> str:
    data = {"base_model": base_id, "base_model_relation": relation, "library_name": "onnx",
            "tags": _tags("onnx"), "pipeline_tag": task}
    lines = [
        f"# {name}",
        "",
        f"`{base_id}` exported to ONNX by ia3tools {__version__} for `{task}`.",
        "",
        f"- Inputs: {', '.join(f'`{n}`' for n in inputs)} (dynamic batch and sequence)",
        f"- Outputs: {', '.join(f'`{n}`' for n in outputs)}",
        f"- Parity with the float32 torch model: {parity}",
        f"- Made by: `{command}`",
    ]
    return _render(data, "\n".join(lines))


def extract_card(*, name: str, base_id: str, merged: str, modules: int, heads: list[str], command: str) -> str:
    data = {"base_model": base_id, "base_model_relation": "adapter", "library_name": "peft",
            "tags": _tags("extract")}
    lines = [
        f"# {name}",
        "",
        f"An IA3 adapter extracted by ia3tools {__version__} from `{merged}`, a merge of {_link(base_id)}: "
        f"{modules} vectors" + (f" and the modules_to_save {', '.join(f'`{h}`' for h in heads)}" if heads else "") + ".",
        "",
        f"`ia3tools merge {base_id} {name}` reproduces the merged model's tensors bit for bit. Vectors are the "
        "float32 values that do, not necessarily the adapter the merge was made from.",
        "",
        f"Made by: `{command}`",
    ]
    return _render(data, "\n".join(lines))
