import numpy as np
import pytest
from conftest import FIXTURES, edit_json, st_bytes
from safetensors import safe_open

from ia3tools.errors import AdapterError, FormatError
from ia3tools.formats import read_adapter
from ia3tools.formats.adapter import ModuleNames


def test_reads_vectors_and_heads_as_stored():
    adapter = read_adapter(FIXTURES / "bert-cls" / "adapter")
    with safe_open(FIXTURES / "bert-cls" / "adapter" / "adapter_model.safetensors", "np") as f:
        keys = list(f.keys())
        for module, vector in adapter.vectors.items():
            np.testing.assert_array_equal(vector, f.get_tensor(f"base_model.model.{module}.ia3_l"))
        head = f.get_tensor("base_model.model.classifier.weight")
        assert adapter.head_bytes("classifier.weight") == head.tobytes()
    assert len(adapter.vectors) + len(adapter.heads) == len(keys)
    assert set(adapter.heads) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"peft_type": "LORA"}, "peft_type is 'LORA', not 'IA3'"),
        ({"target_modules": None}, "target_modules is not set"),
        ({"target_modules": [1, 2]}, "target_modules must be a list of module names or a regex string"),
        ({"target_modules": "(unclosed"}, "target_modules is not a valid regular expression"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out must be true or false"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list of module names"),
    ],
)
def test_bad_configs(fixture_copy, changes, message):
    _, adapter = fixture_copy("llama")
    edit_json(adapter / "adapter_config.json", **changes)
    with pytest.raises(AdapterError) as exc:
        read_adapter(adapter)
    assert str(exc.value).startswith(f"{adapter / 'adapter_config.json'}: {message}")


def test_duplicate_config_key(fixture_copy):
    _, adapter = fixture_copy("llama")
    path = adapter / "adapter_config.json"
    path.write_text(path.read_text().replace("{", '{"peft_type": "LORA",', 1))
    with pytest.raises(FormatError, match="duplicate key 'peft_type' in adapter config"):
        read_adapter(adapter)


def test_not_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter(tmp_path)


@pytest.mark.parametrize(
    "key, message",
    [
        ("model.layers.0.k.ia3_l", "key does not start with 'base_model.model.'"),
        ("base_model.model.model.layers.0.k.lora_A", "tensor is neither an IA3 vector nor under modules_to_save"),
    ],
)
def test_bad_keys(fixture_copy, key, message):
    _, adapter = fixture_copy("llama")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(st_bytes({key: {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(AdapterError) as exc:
        read_adapter(adapter)
    assert str(exc.value) == f"{weights}: tensor '{key}': {message}"


def test_target_matching_follows_peft():
    from peft import IA3Config
    from peft.tuners.ia3 import IA3Model
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = ["a.self_attn.k_proj", "k_proj", "a.xk_proj", "b.attention.output.dense", "b.output.dense", "c.wo"]
    for targets, ff in [(["k_proj", "output.dense", "wo"], ["output.dense"]), (r".*\.(k_proj|wo)", r".*wo")]:
        cfg = IA3Config(target_modules=targets, feedforward_modules=ff)
        for m in modules:
            assert ModuleNames(targets, "dot")(m) == bool(check_target_module_exists(cfg, m)), m
            from ia3tools.formats.adapter import AdapterConfig

            ours = AdapterConfig(None, targets, ff, False, [], None, None, None, {})
            assert ours.is_feedforward(m) == IA3Model._check_target_module_feedforward(cfg, m), m
