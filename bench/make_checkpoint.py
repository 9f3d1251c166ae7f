"""Write a synthetic Llama-shaped checkpoint of a requested size and a matching IA3 adapter, fast:
no model is instantiated, tensors are filled by tiling one random block, and the files follow the
layout transformers writes (shards named model-0000i-of-0000N.safetensors, an index with
metadata.total_size, config.json and generation_config.json).

    python bench/make_checkpoint.py --size-gb 2 --dtype bf16 --shard-size 2GB -o bench/out/llama-2gb
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 2048, 5632, 32000, 32  # TinyLlama-1.1B's shape, layer count scaled
NP = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}
ST = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    specs = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (HIDDEN,))]
        specs += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        specs += [(p + "post_attention_layernorm.weight", (HIDDEN,))]
        specs += [(p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                  (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    specs += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return specs


def layers_for(size_bytes: float, itemsize: int) -> int:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * itemsize
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * itemsize
    return max(1, round((size_bytes - fixed) / per_layer))


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, block: bytes) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    itemsize = np.dtype(NP[dtype]).itemsize
    for name, shape in tensors:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in tensors:
            remaining = int(np.prod(shape)) * itemsize
            while remaining:
                chunk = block[: min(len(block), remaining)]
                f.write(chunk)
                remaining -= len(chunk)
    return offset


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, required=True)
    ap.add_argument("--dtype", choices=list(NP), default="bf16")
    ap.add_argument("--shard-size", default="2GB", help="e.g. 2GB, 5GB")
    ap.add_argument("-o", "--output", type=Path, required=True, help="creates OUTPUT/base and OUTPUT/adapter")
    args = ap.parse_args(argv)
    shard_bytes = int(float(args.shard_size.upper().removesuffix("GB")) * 1e9)
    itemsize = np.dtype(NP[args.dtype]).itemsize
    layers = layers_for(args.size_gb * 1e9, itemsize)
    base, adapter = args.output / "base", args.output / "adapter"
    base.mkdir(parents=True, exist_ok=False)
    adapter.mkdir(parents=True)
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(8 << 20, dtype=np.float32) * 0.02).astype(NP[args.dtype]).tobytes()

    groups, current, size = [], [], 0
    for name, shape in tensor_specs(layers):
        n = int(np.prod(shape)) * itemsize
        if current and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    groups.append(current)
    total, weight_map = 0, {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        total += write_shard(base / shard, group, args.dtype, block)
        weight_map.update({name: shard for name, _ in group})
    if len(groups) > 1:
        (base / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype],
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))

    from safetensors.numpy import save_file

    vectors = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}."
        vectors[p + "self_attn.k_proj.ia3_l"] = (1 + 0.1 * rng.standard_normal((HIDDEN, 1))).astype(np.float32)
        vectors[p + "self_attn.v_proj.ia3_l"] = (1 + 0.1 * rng.standard_normal((HIDDEN, 1))).astype(np.float32)
        vectors[p + "mlp.down_proj.ia3_l"] = (1 + 0.1 * rng.standard_normal((1, INTERMEDIATE))).astype(np.float32)
    save_file(vectors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
        "fan_in_fan_out": False, "modules_to_save": None, "init_ia3_weights": True, "inference_mode": True,
    }, indent=2))
    print(f"{base}: {layers} layers, {total / 1e9:.2f} GB in {len(groups)} shard(s); adapter {adapter}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
