"""Parity between a torch model and its ONNX export, on inputs shaped unlike the export's.

Only real positions count: where an attention mask marks padding, those positions of a
per-token output are left out. Errors are per output: ``max_abs`` = max |onnx - torch| and
``max_rel`` = max_abs / max |torch| (relative to the output's scale, so values near zero do not
inflate it).
"""

from __future__ import annotations

import numpy as np


def compare(reference: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> dict:
    """``max_abs`` and ``max_rel`` over the real positions; both None (with a ``note``) when the
    shapes differ or the ONNX output is not finite."""
    if reference.shape != got.shape:
        return {"max_abs": None, "max_rel": None,
                "note": f"shape {list(got.shape)} differs from {list(reference.shape)}"}
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    ref = np.abs(reference.astype(np.float64))
    if mask is not None and diff.ndim >= 2 and diff.shape[:2] == mask.shape:
        keep = mask.astype(bool)
        diff, ref = diff[keep], ref[keep]
    if not np.all(np.isfinite(got)):
        return {"max_abs": None, "max_rel": None, "note": "non-finite values in the ONNX output"}
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(ref.max()) if ref.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}


def run_onnx(model_path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of the ONNX model on onnxruntime's CPU provider, in graph order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure is reported once, by the caller
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)
