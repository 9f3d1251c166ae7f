"""Causal LMs for generation with a KV cache, in optimum's convention.

Inputs: ``input_ids``, ``attention_mask`` (past plus new positions: an axis of its own,
``attention_sequence``, since it is no sum of two named dims), ``position_ids`` where the model's
forward takes them, and ``past_key_values.{i}.key`` / ``.value`` shaped (batch, kv_heads,
past_sequence, head_dim). Outputs: ``logits`` and ``present.{i}.key`` / ``.value`` (past plus the
new steps). The first step takes an empty past, of length 0.

Parity is generation itself: greedy decoding in onnxruntime against transformers' ``generate`` on
the same model (a batch of two with a left-padded row), its tokens and its logits at every step."""

from __future__ import annotations

import inspect

import numpy as np

from ia3tools.exporting.graph import Signature

PROMPT = 5  # the parity prompt's length (the second row is left-padded to it)
NEW_TOKENS = 16


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim), read off the cache a one-step forward fills."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True)
    layers = _layers(out)
    return len(layers), layers[0][0].shape[1], layers[0][0].shape[3]


def _layers(output):
    cache = getattr(output, "past_key_values", None) or getattr(output, "cache", None)
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [tuple(layer[:2]) for layer in cache]  # a legacy tuple cache


def past_signature(model) -> Signature:
    layers, _, _ = cache_shape(model)
    inputs = ["input_ids", "attention_mask"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "attention_sequence"}}
    if "position_ids" in inspect.signature(model.forward).parameters:
        inputs.append("position_ids")
        axes["position_ids"] = {0: "batch", 1: "sequence"}
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past})
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return Signature(inputs + past, outputs, axes=axes)


def wrap_past(model, signature: Signature):
    """The model as a module taking the past as plain tensors (rebuilt into a DynamicCache) and
    returning the logits and the present cache, flat."""
    import torch
    from transformers import DynamicCache

    takes_cache = "cache" in inspect.signature(model.forward).parameters
    names = [n for n in signature.inputs if not n.startswith("past_key_values.")]

    class Past(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            feed = dict(zip(names, inputs))
            past = inputs[len(names):]
            cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
            feed["cache" if takes_cache else "past_key_values"] = cache
            out = self.model(**feed, use_cache=True)
            return (out.logits, *[t for pair in _layers(out) for t in pair])

    return Past().eval()


def past_inputs(model, signature: Signature, batch: int, length: int, past: int, seed: int) -> dict:
    """Export inputs: distinct sizes >= 2, since sizes 0 and 1 are fixed in the graph and equal ones merged."""
    import torch

    _, heads, dim = cache_shape(model)
    g = torch.Generator().manual_seed(seed)
    feed = {"input_ids": torch.randint(0, model.config.vocab_size, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, past + length, dtype=torch.int64),
            "position_ids": torch.arange(past, past + length).repeat(batch, 1)}
    for name in signature.inputs:
        if name.startswith("past_key_values."):
            feed[name] = torch.randn(batch, heads, past, dim, generator=g)
    return {name: feed[name] for name in signature.inputs}


def prompt(vocab: int, seed: int = 1):
    """The parity prompt: two rows of PROMPT positions, the second left-padded by two."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, PROMPT)).astype(np.int64)
    mask = np.ones((2, PROMPT), np.int64)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def reference_generation(model, ids: np.ndarray, mask: np.ndarray):
    """transformers' greedy ``generate`` on the torch model: (tokens (batch, NEW_TOKENS), logits per step)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             generation_config=config)
    return out.sequences[:, ids.shape[1]:].numpy(), [step.numpy() for step in out.logits]


def greedy(session, signature: Signature, ids: np.ndarray, mask: np.ndarray, steps: int,
           forced: np.ndarray | None = None):
    """Greedy decoding in onnxruntime, as ``generate`` does it: position ids cumsum(mask) - 1 (0 on
    padding), then one more per step; an empty past first. With ``forced`` (batch, steps), those
    tokens are fed instead of the argmax (teacher forcing). Returns (tokens, logits per step)."""
    past_names = [n for n in signature.inputs if n.startswith("past_key_values.")]
    shapes = {i.name: i for i in session.get_inputs()}
    batch = ids.shape[0]
    first = shapes[past_names[0]].shape if past_names else None
    heads, dim = first[1], first[3]
    feed = {name: np.zeros((batch, heads, 0, dim), np.float32) for name in past_names}
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    tokens, logits = [], []
    step_ids, step_mask, step_positions = ids, mask, positions
    for step in range(steps):
        feed.update({"input_ids": step_ids, "attention_mask": step_mask})
        if "position_ids" in shapes:
            feed["position_ids"] = step_positions
        outputs = session.run(None, feed)
        last = outputs[0][:, -1, :]
        logits.append(last)
        chosen = forced[:, step] if forced is not None else last.argmax(-1)
        tokens.append(chosen)
        feed.update(dict(zip(past_names, outputs[1:])))
        step_ids = chosen.reshape(batch, 1).astype(np.int64)
        step_mask = np.concatenate([step_mask, np.ones((batch, 1), np.int64)], axis=1)
        step_positions = step_positions[:, -1:] + 1
    return np.stack(tokens, axis=1), logits
