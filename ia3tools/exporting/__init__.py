"""Exporting merged models to ONNX: loading them faithfully, tracing, tidying, proving parity."""
