"""Runtime adapters around one export: writing ``OUT/adapters/<name>.onnx_adapter`` and proving,
in one onnxruntime session, that switching between them gives each adapted model's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ia3tools.exporting.parity import ErrorStats, compare, passes
from ia3tools.exporting.slots import ADAPTER_SUFFIX, ADAPTERS_DIR, RuntimeAdapter, Slot, write_adapter_file


@dataclass
class RuntimePlan:
    slots: list[Slot]
    adapters: list[RuntimeAdapter]


@dataclass
class AdapterFile:
    """One adapter written for an export: ``file`` relative to the export, its size, how many
    vectors it sets (the other slots stay at ones) and where it came from."""

    name: str
    file: str
    bytes: int
    vectors: int
    source: str


@dataclass
class Switch:
    """One run of the switching check: the adapter active (None: none) and its errors against the
    torch model with that adapter folded in."""

    adapter: str | None
    passed: bool
    outputs: dict[str, ErrorStats] = field(default_factory=dict)


def adapter_path(export_dir: Path, name: str) -> Path:
    return export_dir / ADAPTERS_DIR / f"{name}{ADAPTER_SUFFIX}"


def write_adapters(export_dir: Path, adapters: list[RuntimeAdapter]) -> list[AdapterFile]:
    """Each adapter's file in ``export_dir/adapters`` (the export's staging, or a scratch directory)."""
    (export_dir / ADAPTERS_DIR).mkdir(exist_ok=True)
    files = []
    for adapter in adapters:
        path = adapter_path(export_dir, adapter.name)
        write_adapter_file(path, adapter.values)
        files.append(AdapterFile(adapter.name, f"{ADAPTERS_DIR}/{path.name}", path.stat().st_size,
                                 len(adapter.values), str(adapter.path)))
    return files


def switching_order(names: list[str]) -> list[str | None]:
    """Every adapter in turn, then none, then the first again: A -> B -> none -> A."""
    return [*names, None, names[0]] if names else []


def prove_switching(sess, export_dir: Path, names: list[str], feed: dict[str, np.ndarray], mask, output_names,
                    references: dict[str, list[np.ndarray]], atol: float) -> list[Switch]:
    """Run ``sess`` (the export's session, loaded once) on ``feed`` with each adapter of the
    switching order active, against ``references`` (adapter name, or None, -> torch outputs)."""
    import onnxruntime as ort

    loaded = {}
    for name in names:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_path(export_dir, name)))
        loaded[name] = adapter
    steps = []
    for name in switching_order(names):
        run_options = ort.RunOptions()
        if name is not None:
            run_options.add_active_adapter(loaded[name])
        got = sess.run(None, feed, run_options)
        errors = {out: compare(ref, g, mask, logits=out == "logits")
                  for out, ref, g in zip(output_names, references[name], got)}
        steps.append(Switch(name, all(passes(e, "fp32", atol, out == "logits") for out, e in errors.items()), errors))
    return steps
