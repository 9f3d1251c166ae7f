"""ia3tools: inspect, check, merge, verify and blend PEFT IA3 adapters offline, on saved
checkpoints, extract them back from merged models, diff checkpoints, and export merged models to
ONNX (or one base with IA3 adapters switched per run).

The Python API is what the command line runs::

    from ia3tools import merge, MergeOptions
    report = merge("base", "adapter", "merged", MergeOptions(dtype="bf16"))
    report.ok, report.folded, report.to_json()

Every function returns a typed report (``ok``, ``warnings``, ``to_json()``) and raises an
``Ia3Error`` (one line, naming the file and tensor at fault) for a bad input. Names are loaded on
first use, so ``import ia3tools`` costs almost nothing and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "inspect": "ia3tools.commands.inspect", "AdapterInspection": "ia3tools.commands.inspect",
    "CheckpointInspection": "ia3tools.commands.inspect",
    "check": "ia3tools.commands.check", "CheckReport": "ia3tools.commands.check",
    "merge": "ia3tools.commands.merge", "MergeOptions": "ia3tools.commands.merge", "MergeReport": "ia3tools.commands.merge",
    "verify": "ia3tools.commands.verify", "VerifyReport": "ia3tools.commands.verify",
    "blend": "ia3tools.commands.blend", "BlendOptions": "ia3tools.commands.blend", "BlendReport": "ia3tools.commands.blend",
    "extract": "ia3tools.commands.extract", "ExtractOptions": "ia3tools.commands.extract",
    "ExtractReport": "ia3tools.commands.extract",
    "diff": "ia3tools.commands.diff", "DiffReport": "ia3tools.commands.diff",
    "export_onnx": "ia3tools.commands.export_onnx", "ExportOptions": "ia3tools.commands.export_onnx",
    "ExportReport": "ia3tools.commands.export_onnx",
    "onnx_adapter": "ia3tools.commands.onnx_adapter", "OnnxAdapterOptions": "ia3tools.commands.onnx_adapter",
    "OnnxAdapterReport": "ia3tools.commands.onnx_adapter",
    "Report": "ia3tools.reports", "Notice": "ia3tools.errors",
    "Ia3Error": "ia3tools.errors", "FormatError": "ia3tools.errors", "AdapterError": "ia3tools.errors",
    "PlanError": "ia3tools.errors", "FoldError": "ia3tools.errors", "OutputError": "ia3tools.errors",
    "BlendError": "ia3tools.errors", "ExportError": "ia3tools.errors", "ExtractError": "ia3tools.errors", "OptionError": "ia3tools.errors",
    "MissingDependency": "ia3tools.errors",
}

__all__ = [  # = sorted(_API), spelt out for static tools
    "AdapterError", "AdapterInspection", "BlendError", "BlendOptions", "BlendReport", "CheckReport",
    "CheckpointInspection", "DiffReport", "ExportError", "ExportOptions", "ExportReport", "ExtractError",
    "ExtractOptions", "ExtractReport", "FoldError", "FormatError", "Ia3Error", "MergeOptions", "MergeReport",
    "MissingDependency", "Notice", "OnnxAdapterOptions", "OnnxAdapterReport", "OptionError", "OutputError",
    "PlanError", "Report", "VerifyReport", "__version__", "blend", "check", "diff", "export_onnx", "extract",
    "inspect", "merge", "onnx_adapter", "verify",
]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'ia3tools' has no attribute {name!r}")


def __dir__():
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from ia3tools.commands.blend import BlendOptions, BlendReport, blend
    from ia3tools.commands.check import CheckReport, check
    from ia3tools.commands.diff import DiffReport, diff
    from ia3tools.commands.export_onnx import ExportOptions, ExportReport, export_onnx
    from ia3tools.commands.extract import ExtractOptions, ExtractReport, extract
    from ia3tools.commands.inspect import AdapterInspection, CheckpointInspection, inspect
    from ia3tools.commands.merge import MergeOptions, MergeReport, merge
    from ia3tools.commands.onnx_adapter import OnnxAdapterOptions, OnnxAdapterReport, onnx_adapter
    from ia3tools.commands.verify import VerifyReport, verify
    from ia3tools.errors import (AdapterError, BlendError, ExportError, ExtractError, FoldError, FormatError,
                                 Ia3Error, MissingDependency, Notice, OptionError, OutputError, PlanError)
    from ia3tools.reports import Report
