"""Parity between a torch model and its ONNX export, on inputs shaped unlike the export's.

Only real positions count: where an attention mask marks padding, those positions of a
per-token output are left out. Per output: ``max_abs`` = max |onnx - torch|, ``max_rel`` =
max_abs / max |torch| (relative to the output's scale, so values near zero do not inflate it),
``top1`` = the share of positions where the two agree on the largest logit, and ``cosine`` = the
smallest cosine similarity of an output vector with its torch counterpart.

What passes: a float32 export must stay within ``--atol``; a smaller one is judged by what its
rounding is allowed to change: logits must agree on top-1 at least ``TOP1[precision]`` of the
time, other outputs point the same way (cosine at least ``COSINE[precision]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP1 = {"fp16": 0.9, "int8": 0.8}
COSINE = {"fp16": 0.99, "int8": 0.95}


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float | None  # None: not finite (or shapes differ, see note)
    max_rel: float | None  # max_abs / max |torch output|
    top1: float | None = None  # logits: share of positions whose argmax agrees
    cosine: float | None = None  # smallest cosine similarity of an output vector with torch's
    note: str | None = None


@dataclass(frozen=True)
class Generation:
    """Greedy decoding with the cache, against transformers' ``generate`` on the same prompts."""

    batch: int
    prompt: int  # positions, the second row left-padded
    new_tokens: int
    tokens_equal: bool  # free-running greedy tokens all equal generate's
    steps_top1: float  # fed generate's tokens, the share of steps whose argmax agrees


@dataclass
class Parity:
    outputs: dict[str, ErrorStats]
    atol: float
    passed: bool
    inputs: dict[str, list[int]]  # the shapes fed
    generation: Generation | None = None
    switching: list | None = None  # runtime adapters: runtime.Switch per run, in the order run


def compare(reference: np.ndarray, got: np.ndarray, mask: np.ndarray | None, logits: bool = False) -> ErrorStats:
    """The errors over the real positions; None (with a ``note``) when the shapes differ or the
    ONNX output is not finite."""
    if reference.shape != got.shape:
        return ErrorStats(None, None, note=f"shape {list(got.shape)} differs from {list(reference.shape)}")
    if not np.all(np.isfinite(got)):
        return ErrorStats(None, None, note="non-finite values in the ONNX output")
    ref, out = reference.astype(np.float64), got.astype(np.float64)
    if mask is not None and ref.ndim >= 2 and ref.shape[:2] == mask.shape:
        keep = mask.astype(bool)
        ref, out = ref[keep], out[keep]
    diff = np.abs(out - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    vectors_ref, vectors_out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    norms = np.linalg.norm(vectors_ref, axis=1) * np.linalg.norm(vectors_out, axis=1)
    cosine = float(np.min(np.sum(vectors_ref * vectors_out, axis=1) / np.maximum(norms, 1e-30))) if norms.size else 1.0
    top1 = float(np.mean(vectors_ref.argmax(-1) == vectors_out.argmax(-1))) if logits and vectors_ref.size else None
    return ErrorStats(max_abs, max_abs / scale if scale > 0 else max_abs, top1, cosine)


def worst(outputs: dict[str, ErrorStats]) -> tuple[str, ErrorStats]:
    """The output with the largest absolute error (a non-finite one counts as infinite)."""
    return max(outputs.items(), key=lambda kv: float("inf") if kv[1].max_abs is None else kv[1].max_abs)


def passes(stats: ErrorStats, precision: str, atol: float, logits: bool) -> bool:
    if stats.max_abs is None:
        return False
    if precision == "fp32":
        return stats.max_abs <= atol
    if logits:
        return stats.top1 is not None and stats.top1 >= TOP1[precision]
    return stats.cosine is not None and stats.cosine >= COSINE[precision]


def session(model_path):
    """An onnxruntime session on the CPU provider, logging only what is fatal (a failure is
    reported once, by the caller)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run_onnx(model_path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of the ONNX model on onnxruntime's CPU provider, in graph order."""
    return session(model_path).run(None, inputs)
