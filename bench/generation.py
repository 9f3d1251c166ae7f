"""Generation speed: greedy decoding in onnxruntime with the KV cache (`export-onnx --with-past`,
float32 and int8) and without it (the plain export, recomputing the whole sequence per token),
beside transformers' `generate` on the same float32 model, on a Llama-shaped checkpoint.

    python bench/generation.py --params 0.5 --new-tokens 32     # writes bench/out/generation.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
PROMPT = 16


def export(base: Path, target: Path, *options: str) -> Path:
    if not (target / "model.onnx").exists():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "ia3tools", "export-onnx", str(base), "-o", str(target), "-q",
                        "--no-parity", *options], cwd=ROOT, check=True)
    return target


def ort_with_cache(path: Path, ids: np.ndarray, steps: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    feed_ids, mask, positions = ids, np.ones_like(ids), np.arange(ids.shape[1])[None]
    started = time.perf_counter()
    for _ in range(steps):
        logits, *present = session.run(None, {"input_ids": feed_ids, "attention_mask": mask,
                                              "position_ids": positions, **past})
        feed_ids = logits[:, -1].argmax(-1)[:, None]
        past = dict(zip(past, present))
        mask = np.concatenate([mask, np.ones_like(feed_ids)], axis=1)
        positions = positions[:, -1:] + 1
    return steps / (time.perf_counter() - started)


def ort_without_cache(path: Path, ids: np.ndarray, steps: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    sequence = ids
    started = time.perf_counter()
    for _ in range(steps):
        (logits,) = session.run(None, {"input_ids": sequence, "attention_mask": np.ones_like(sequence)})
        sequence = np.concatenate([sequence, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return steps / (time.perf_counter() - started)


def transformers_generate(base: Path, ids: np.ndarray, steps: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=torch.from_numpy(ids), generation_config=GenerationConfig(max_new_tokens=2))
        started = time.perf_counter()
        model.generate(input_ids=torch.from_numpy(ids), generation_config=config)
    return steps / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=0.5, help="billions of parameters (bench/export.py's checkpoints)")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    base = OUT / f"llama-{args.params:g}b" / "base"
    if not base.exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), "--size-gb", str(2 * args.params),
                        "--dtype", "bf16", "-o", str(base.parent)], check=True)
    ids = np.random.default_rng(0).integers(3, 32000, size=(1, PROMPT)).astype(np.int64)
    rows = {
        "transformers generate (float32, cache)": transformers_generate(base, ids, args.new_tokens),
        "onnxruntime, cache (float32)": ort_with_cache(export(base, OUT / "gen-past", "--with-past"), ids,
                                                       args.new_tokens),
        "onnxruntime, cache (int8)": ort_with_cache(export(base, OUT / "gen-past-int8", "--with-past", "--quantize",
                                                           "int8"), ids, args.new_tokens),
        "onnxruntime, no cache (float32)": ort_without_cache(export(base, OUT / "gen-plain"), ids, args.new_tokens),
    }
    result = {"params_b": args.params, "prompt": PROMPT, "new_tokens": args.new_tokens,
              "tokens_per_second": {k: round(v, 2) for k, v in rows.items()}}
    (OUT / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
