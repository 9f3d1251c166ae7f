"""Merged directories that stay whole, proven by their real consumers: transformers loads the dtype
the config names, the Hub's card metadata parses, sentence-transformers loads the model with its
modules, AutoTokenizer loads the tokenizer the model was trained with, and bases named by hub id
resolve offline from the local cache."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import COMMIT, FIXTURES, assert_refused, cli_run, fake_hub_cache

LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")
TEXTS = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13 w14 w15"]


def card(directory):
    from huggingface_hub import metadata_load

    path = directory / "README.md"
    return metadata_load(path), path.read_text()


# --- config follows the weights -------------------------------------------------------------------

@pytest.mark.parametrize("option, torch_dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_dtype_rewrites_the_config_and_transformers_loads_what_was_written(tmp_path, option, torch_dtype):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli_run("merge", *LLAMA, "-o", out, "--dtype", option, "-q").exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(torch_dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch_dtype}


def test_an_older_config_with_torch_dtype_gets_both_keys(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype", "bfloat16")
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    assert cli_run("merge", base, adapter, "-o", out, "--dtype", "fp16", "-q").exit_code == 0
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float16"


def test_without_dtype_the_config_is_the_bases(tmp_path):
    out = tmp_path / "merged"
    assert cli_run("merge", *LLAMA, "-o", out, "-q").exit_code == 0
    assert (out / "config.json").read_bytes() == (LLAMA[0] / "config.json").read_bytes()


# --- model cards ----------------------------------------------------------------------------------------

def test_a_merge_gets_its_own_model_card(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- llama\n---\n\n# The base's own card\n")
    out = tmp_path / "merged"
    assert cli_run("merge", base, adapter, "-o", out, "-q").exit_code == 0
    meta, text = card(out)
    assert meta["base_model"] == "base" and meta["base_model_relation"] == "finetune"  # no hub id: the dir name
    assert meta["library_name"] == "transformers" and "ia3" in meta["tags"] and meta["license"] == "apache-2.0"
    sha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert sha in text and "adapter" in text and "ia3tools 0.1.0" in text
    assert f"ia3tools merge {base} {adapter} -o {out}" in text
    assert "The base's own card" not in text


def test_the_adapters_hub_id_names_the_base_in_the_card(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someorg/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli_run("merge", base, adapter, "-o", tmp_path / "m", "-q").exit_code == 0
    assert card(tmp_path / "m")[0]["base_model"] == "someorg/tiny-llama"


def test_blend_writes_a_card(tmp_path):
    a = LLAMA[1]
    assert cli_run("blend", a, a, "-w", "0.5", "0.5", "-o", tmp_path / "blend", "-q").exit_code == 0
    meta, text = card(tmp_path / "blend")
    assert meta["library_name"] == "peft" and "blend" in meta["tags"] and "| 0.5 |" in text
    assert hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest() in text
    # export-onnx --adapter's card: test_the_base_left_out_is_the_one_the_adapter_names


# --- sentence-transformers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sentence_pair(tmp_path_factory):
    """A sentence-transformers model (mean pooling, normalised) and an IA3 adapter trained on its BERT."""
    from tiny import add_ia3, build_model, save_sentence_model

    root = tmp_path_factory.mktemp("st")
    model_dir = save_sentence_model(root, "mean", True)
    peft_model = add_ia3(build_model("bert-cls").base_model, "bert-cls", seed=3, task_type="FEATURE_EXTRACTION",
                         modules_to_save=None)
    peft_model.save_pretrained(root / "adapter")
    return model_dir, root / "adapter"


def adapted_embeddings(model_dir, adapter):
    """The reference: sentence-transformers' own model with PEFT applying the adapter to its BERT."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    st[0].auto_model = PeftModel.from_pretrained(st[0].auto_model, adapter).eval()
    return st.encode(TEXTS, convert_to_numpy=True)


@pytest.mark.parametrize("layout", ["root", "0_Transformer"])
def test_sentence_transformers_models_merge_with_their_modules(sentence_pair, tmp_path, layout):
    from sentence_transformers import SentenceTransformer
    from tiny import move_transformer_to_subfolder

    model_dir, adapter = sentence_pair
    if layout != "root":
        model_dir = move_transformer_to_subfolder(shutil.copytree(model_dir, tmp_path / "older"))
    expected = adapted_embeddings(model_dir, adapter)
    out = tmp_path / "merged"
    result = cli_run("merge", model_dir, adapter, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert (out / "1_Pooling" / "config.json").exists() and (out / "2_Normalize").is_dir()
    if layout != "root":
        assert (out / "0_Transformer" / "model.safetensors").exists() and not (out / "model.safetensors").exists()
    got = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert card(out)[0]["library_name"] == "sentence-transformers"
    assert cli_run("check", model_dir, adapter).exit_code == 0
    assert cli_run("verify", model_dir, adapter, out).exit_code == 0
    inspected = json.loads(cli_run("inspect", out, "--json").stdout)
    assert inspected["kind"] == "checkpoint" and inspected["tensors"] > 0


# --- the adapter's tokenizer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_with_tokenizer(tmp_path_factory):
    """The Llama adapter, saved with a tokenizer of its own and a chat template, as TRL saves them."""
    from tiny import save_tokenizer
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tok")
    adapter = shutil.copytree(LLAMA[1], root / "adapter")
    save_tokenizer(root / "tok")
    tok = AutoTokenizer.from_pretrained(root / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    tok.chat_template = "{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}"
    tok.save_pretrained(adapter)
    return adapter


def test_the_adapters_tokenizer_and_chat_template_come_along(adapter_with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    result = cli_run("merge", LLAMA[0], adapter_with_tokenizer, "-o", out)
    assert result.exit_code == 0, result.output
    assert "tokenizer and chat template from the adapter" in result.stdout
    merged = AutoTokenizer.from_pretrained(out)
    trained = AutoTokenizer.from_pretrained(adapter_with_tokenizer)
    assert merged.chat_template == trained.chat_template and "<|user|>" in merged.get_vocab()
    assert merged("w5 w6").input_ids == trained("w5 w6").input_ids
    kept = tmp_path / "kept"
    assert cli_run("merge", LLAMA[0], adapter_with_tokenizer, "-o", kept, "--tokenizer-from", "base", "-q").exit_code == 0
    assert AutoTokenizer.from_pretrained(kept).chat_template is None
    assert json.loads(cli_run("merge", *LLAMA, "-o", tmp_path / "plain", "--json").stdout)["tokenizer_from"] == "base"
    missing = cli_run("merge", *LLAMA, "-o", tmp_path / "x", "--tokenizer-from", "adapter")
    assert_refused(missing, LLAMA[1], out=tmp_path / "x")


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_embeddings_resized_in_modules_to_save(tmp_path, with_tokenizer):
    from peft import IA3Config, get_peft_model
    from tiny import build_model, save_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    build_model("llama").save_pretrained(base)
    model = build_model("llama")
    model.resize_token_embeddings(132)
    peft_model = get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"],
                                                 modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.add_(0.1)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    if with_tokenizer:
        save_tokenizer(tmp_path / "tok", vocab_size=132)
        AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(adapter)
    out = tmp_path / "merged"
    result = cli_run("merge", base, adapter, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert ("resizes the vocabulary to 132" in result.stderr) is not with_tokenizer
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.vocab_size == 132
    ids = torch.tensor([[3, 7, 130, 131]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


# --- hub ids, resolved offline in the local cache -----------------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    fake_hub_cache(cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_base_named_by_hub_id_or_cache_directory(hub, tmp_path):
    reference = tmp_path / "reference"
    assert cli_run("merge", *LLAMA, "-o", reference, "-q").exit_code == 0
    for i, spec in enumerate(["someorg/tiny-llama", f"someorg/tiny-llama@{COMMIT}",
                              hub / "models--someorg--tiny-llama"]):
        out = tmp_path / f"m{i}"
        result = cli_run("merge", spec, LLAMA[1], "-o", out, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["base_id"] == "someorg/tiny-llama"
        assert card(out)[0]["base_model"] == "someorg/tiny-llama"
        for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            assert (out / f).read_bytes() == (reference / f).read_bytes()


def test_the_base_left_out_is_the_one_the_adapter_names(hub, tmp_path):
    adapter = shutil.copytree(LLAMA[1], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someorg/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    assert cli_run("merge", adapter, "-o", out, "-q").exit_code == 0
    assert cli_run("check", adapter).exit_code == 0
    assert cli_run("verify", adapter, out).exit_code == 0
    assert cli_run("export-onnx", "--adapter", adapter, "-o", tmp_path / "onnx", "-q").exit_code == 0
    meta, text = card(tmp_path / "onnx")  # the export's card: the base named by id, a finetune of it
    assert meta["library_name"] == "onnx" and meta["base_model_relation"] == "finetune"
    assert meta["base_model"] == "someorg/tiny-llama"
    assert meta["pipeline_tag"] == "text-generation" and "logits max abs error" in text
    cfg["base_model_name_or_path"] = str(LLAMA[0])  # a local path works the same way
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli_run("check", adapter).exit_code == 0


def test_an_id_not_in_the_cache_is_one_line_and_never_fetched(hub, tmp_path, monkeypatch):
    import socket

    attempts = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or (_ for _ in ()).throw(OSError()))
    out = tmp_path / "m"
    line = assert_refused(cli_run("merge", "someorg/absent", LLAMA[1], "-o", out), "someorg/absent", str(hub), out=out)
    assert "not in the local Hugging Face cache" in line and "hf download someorg/absent" in line
    line = assert_refused(cli_run("merge", "someorg/tiny-llama@nosuchref", LLAMA[1], "-o", out), out=out)
    assert "someorg/tiny-llama@nosuchref" in line
    assert attempts == []
