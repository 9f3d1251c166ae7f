"""Hostile inputs, second round, at the tensor level: empty and degenerate tensors in every merge
path, tensors a ``.bin`` may hold but a merge cannot (sparse, meta, quantized), usage and device
errors, and name resolution that stays linear in the number of vectors."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_refused, cli_run
from make_bad import f32, safetensors_bytes, write_pair

from ia3tools.formats.safetensors import SafetensorsFile

NP = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32}
HUGE = 2**62

Q = np.linspace(-2, 2, 16, dtype=np.float32).reshape(4, 4)
Q_BIAS = np.array([0.5, -0.25, 0.125, 1.0], np.float32)
Q_VEC = np.array([[1.5], [0.5], [-1.0], [2.0]], np.float32)

CONFIG = {"peft_type": "IA3", "target_modules": ["q", "ff", "e", "wide"], "feedforward_modules": ["ff", "wide"],
          "fan_in_fan_out": False, "modules_to_save": ["head", "newhead"]}


def empty_pair(root, dtype: str, as_bin: bool = False):
    """A base mixing one real square projection with tensors that have a zero dimension: targeted
    feed-forward (0, 6) and (2**62, 0), targeted output-scaled (0, 4) with a (0,) bias, an untouched
    (2**62, 0), and a (0, 4) head the adapter replaces, plus one it adds."""
    cast = NP[dtype]
    values = {"layer.q.weight": Q, "layer.q.bias": Q_BIAS, "layer.ff.weight": np.empty((0, 6)),
              "layer.e.weight": np.empty((0, 4)), "layer.e.bias": np.empty(0), "layer.wide.weight": (HUGE, 0),
              "huge.weight": (HUGE, 0), "head.weight": np.empty((0, 4))}
    shapes = {n: list(v) if isinstance(v, tuple) else list(v.shape) for n, v in values.items()}
    adapter = [
        ("base_model.model.layer.q.ia3_l", "F32", [4, 1], f32(Q_VEC)),
        ("base_model.model.layer.ff.ia3_l", "F32", [1, 6], f32(np.full((1, 6), 0.5))),
        ("base_model.model.layer.e.ia3_l", "F32", [0, 1], b""),
        ("base_model.model.layer.wide.ia3_l", "F32", [1, 0], b""),
        ("base_model.model.head.weight", "F32", [0, 4], b""),
        ("base_model.model.newhead.weight", "F32", [0, 4], b""),
    ]
    if as_bin:
        base, adapter_dir = write_pair(root, adapter=safetensors_bytes(adapter), config=CONFIG)
        torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
        torch.save({n: (torch.empty(v, dtype=torch_dtype) if isinstance(v, tuple) else
                        torch.from_numpy(np.asarray(v, np.float32)).to(torch_dtype)) for n, v in values.items()},
                   base / "pytorch_model.bin")
        return base, adapter_dir
    tensors = [(n, dtype, shapes[n], b"" if isinstance(v, tuple) else np.asarray(v, np.float32).astype(cast).tobytes())
               for n, v in values.items()]
    return write_pair(root, base=safetensors_bytes(tensors), adapter=safetensors_bytes(adapter), config=CONFIG)


def expected_q(dtype: str, out_dtype: str):
    """First principles: cast to the output dtype (as from_pretrained(dtype=...) would), multiply
    in float32 by the vector (rows, bias included), cast back once."""
    cast_in, cast_out = NP[dtype], NP[out_dtype]
    w = Q.astype(cast_in).astype(cast_out).astype(np.float32)
    b = Q_BIAS.astype(cast_in).astype(cast_out).astype(np.float32)
    return (w * Q_VEC).astype(cast_out), (b * Q_VEC[:, 0]).astype(cast_out)


@pytest.mark.timeout(120)  # a fold that walked the 2**62 rows one block at a time would never end
@pytest.mark.parametrize("dtype, option, as_bin", [
    ("F16", None, False), ("BF16", None, False), ("F32", None, False),
    ("BF16", "fp32", False), ("F32", "bf16", False), ("F16", None, True), ("BF16", "fp16", True),
])
def test_empty_tensors_merge_and_verify_at_once(tmp_path, dtype, option, as_bin):
    base, adapter = empty_pair(tmp_path / "pair", dtype, as_bin)
    out = tmp_path / "merged"
    result = cli_run("merge", base, adapter, "-o", out, "-q", *(["--dtype", option] if option else []))
    assert result.exit_code == 0, result.output
    out_dtype = {"fp32": "F32", "bf16": "BF16", "fp16": "F16", None: dtype}[option]
    with SafetensorsFile(out / "model.safetensors") as f:
        shapes = {n: (t.dtype, t.shape, t.nbytes) for n, t in f.tensors.items()}
        weight, bias = expected_q(dtype, out_dtype)
        assert f.read_bytes("layer.q.weight") == weight.tobytes()
        assert f.read_bytes("layer.q.bias") == bias.tobytes()
    assert shapes == {
        "layer.q.weight": (out_dtype, (4, 4), weight.nbytes), "layer.q.bias": (out_dtype, (4,), bias.nbytes),
        "layer.ff.weight": (out_dtype, (0, 6), 0), "layer.e.weight": (out_dtype, (0, 4), 0),
        "layer.e.bias": (out_dtype, (0,), 0), "layer.wide.weight": (out_dtype, (HUGE, 0), 0),
        "huge.weight": (out_dtype, (HUGE, 0), 0), "head.weight": (out_dtype, (0, 4), 0),
        "newhead.weight": (out_dtype, (0, 4), 0),
    }
    verified = cli_run("verify", base, adapter, out)
    assert verified.exit_code == 0, verified.output
    assert cli_run("check", base, adapter).exit_code == 0


# --- what a .bin may hold but a merge cannot ---------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: torch.eye(4).to_sparse(), "sparse (sparse_coo) tensors cannot be merged"),
    (lambda: torch.eye(4).to_sparse_csr(), "sparse (sparse_csr) tensors cannot be merged"),
    (lambda: torch.empty(4, 4, device="meta"), "meta (no data) tensors cannot be merged"),
    (lambda: torch.quantize_per_tensor(torch.ones(4, 4), 0.1, 0, torch.qint8), "quantized (qint8) tensors cannot"),
])
def test_bin_tensors_without_plain_bytes_are_refused_by_name(tmp_path, make, message):
    import warnings

    base, adapter = write_pair(tmp_path / "pair", config={**CONFIG, "modules_to_save": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"layer.q.weight": make(), "layer.q.bias": torch.ones(4)}, base / "pytorch_model.bin")
    out = tmp_path / "out"
    line = assert_refused(cli_run("merge", base, adapter, "-o", out, "-q"), base / "pytorch_model.bin",
                          "tensor 'layer.q.weight'", out=out)
    assert message in line


# --- usage and device errors ----------------------------------------------------------------------------

LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")


@pytest.mark.parametrize("size", ["inf", "nan", "-inf", "1e400", "0.5", "0", "-3GB", "2XB"])
def test_max_shard_size_must_be_a_finite_positive_size(tmp_path, size):
    result = cli_run("merge", *LLAMA, "-o", tmp_path / "m", "--max-shard-size", size)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "not a size" in result.output and not (tmp_path / "m").exists()


def test_a_cuda_device_past_the_count_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    out = tmp_path / "m"
    line = assert_refused(cli_run("merge", *LLAMA, "-o", out, "--device", "cuda:2"), out=out)
    assert line == "Error: --device cuda:2: torch sees 2 CUDA device(s), numbered 0 to 1"


# --- name resolution stays linear ---------------------------------------------------------------------------

class CountingTensors(dict):
    """A checkpoint's tensor table that counts full scans of itself."""

    scans = 0

    def __iter__(self):
        CountingTensors.scans += 1
        return super().__iter__()


@pytest.mark.parametrize("base_prefix, adapter_prefix, kind", [("", "model.", "strip"), ("model.", "", "add")])
def test_ten_thousand_vectors_across_a_backbone_prefix_plan_in_linear_time(tmp_path, base_prefix, adapter_prefix,
                                                                          kind):
    """The bare-backbone case (adapter names carry a prefix the base lacks) with 10,000 vectors: the
    plan scans the base's tensor table a fixed number of times, not once per vector (it used to, and
    took 15-70 s; bench/check_scale.py times it)."""
    from ia3tools import check
    from ia3tools.formats import open_checkpoint, read_adapter
    from ia3tools.plan import build_plan

    n = 10_000
    base_tensors = [(f"{base_prefix}layers.{i}.k.weight", "F32", [2, 2], f32(np.ones((2, 2)))) for i in range(n)]
    base_tensors.append(("lm_head.weight", "F32", [2, 2], f32(np.ones((2, 2)))))
    vectors = [(f"base_model.model.{adapter_prefix}layers.{i}.k.ia3_l", "F32", [2, 1], f32(np.ones((2, 1))))
               for i in range(n)]
    config = {"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": [], "fan_in_fan_out": False}
    base, adapter = write_pair(tmp_path / "pair", base=safetensors_bytes(base_tensors),
                               adapter=safetensors_bytes(vectors), config=config)
    ckpt, ad = open_checkpoint(base), read_adapter(adapter)
    ckpt.tensors = CountingTensors(ckpt.tensors)
    CountingTensors.scans = 0
    plan = build_plan(ckpt, ad)
    assert plan.ok and len(plan.folds) == n and plan.names.kind == kind
    assert CountingTensors.scans <= 5
    ckpt.close()
    ad.close()
    report = check(base, adapter)
    assert report.ok and len(report.folds) == n


def test_a_list_of_ten_thousand_target_names_matches_in_linear_time(tmp_path):
    """Exact-name lists (as a blend of differently scoped adapters writes them) match through a set."""
    from ia3tools.formats.adapter import ModuleNames

    names = [f"model.layers.{i}.self_attn.k_proj" for i in range(10_000)]
    targets = ModuleNames(names, "dot")
    assert all(targets(m) for m in names) and not targets("model.layers.10000.self_attn.k_proj")
    assert targets.unmatched(names[:10]) == names[10:]
    feedforward = ModuleNames(["mlp.down_proj"], "plain")
    assert feedforward("model.layers.3.mlp.down_proj") and feedforward("xmlp.down_proj")
    assert json.dumps(targets.unmatched([])).startswith('["model.layers.0')
