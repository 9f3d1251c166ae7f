"""export-onnx, faithful to how the model is fed: the graph takes what the model's own tokenizer
gives (sentence pairs through token_type_ids), its outputs have the names users know, optimum's
task names are accepted, and a sentence-transformers model also outputs its sentence embedding."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import FIXTURES, ROOT, cli_run
from peft_oracle import load_peft

TEXTS_A = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13"]
TEXTS_B = ["w20 w21", "w22 w23 w24 w25 w26", "w27"]


def session(directory):
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def bert_with_tokenizer(tmp_path_factory):
    """The bare-backbone BERT fixture with its classifier adapter, and a BERT tokenizer saved
    beside the base's weights (as a real checkpoint has one)."""
    from tiny import save_bert_tokenizer

    root = tmp_path_factory.mktemp("bert-tok")
    shutil.copytree(FIXTURES / "bert-cls", root, dirs_exist_ok=True)
    save_bert_tokenizer(root / "base")
    return root / "base", root / "adapter"


def test_sentence_pairs_through_the_models_own_tokenizer(bert_with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    base, adapter = bert_with_tokenizer
    out = tmp_path / "onnx"
    result = cli_run("export-onnx", base, "--adapter", adapter, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "text-classification"
    # the parity check fed every input, with pairs and a padded row, on a shape unlike the export's
    assert set(report["parity"]["inputs"]) == {"input_ids", "attention_mask", "token_type_ids"}
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the export
    feeds = dict(tokenizer(TEXTS_A, TEXTS_B, padding=True, return_tensors="np"))
    assert feeds["token_type_ids"].max() == 1 and feeds["attention_mask"].min() == 0
    sess = session(out)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    (logits,) = sess.run(None, feeds)
    peft_model = load_peft(base, adapter, "BertForSequenceClassification")
    with torch.no_grad():
        expected = peft_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        without_segments = peft_model(input_ids=torch.from_numpy(feeds["input_ids"]),
                                      attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert np.abs(without_segments - expected).max() > 1e-3  # what dropping token_type_ids would cost


def test_every_input_is_dynamic_and_parity_feeds_every_input(bert_with_tokenizer, tmp_path, monkeypatch):
    from ia3tools.exporting import parity

    fed = []
    real = parity.session

    class Recording:
        def __init__(self, path):
            self.inner = real(path)

        def run(self, names, feeds):
            fed.append(feeds)
            return self.inner.run(names, feeds)

    monkeypatch.setattr(parity, "session", Recording)
    base, adapter = bert_with_tokenizer
    out = tmp_path / "onnx"
    assert cli_run("export-onnx", base, "--adapter", adapter, "-o", out, "-q").exit_code == 0
    (feeds,) = fed
    assert set(feeds["token_type_ids"].ravel()) == {0, 1} and 0 in feeds["attention_mask"]
    assert all(v.shape == (3, 5) for v in feeds.values())  # the export traced (2, 8)
    for graph_input in session(out).get_inputs():
        assert graph_input.shape == ["batch", "sequence"], graph_input


@pytest.mark.parametrize("arch, task, alias, output", [
    ("llama", "text-generation", "causal-lm", "logits"),
    ("bert-cls", "feature-extraction", "feature-extraction", "last_hidden_state"),
])
def test_output_names_and_task_aliases(tmp_path, arch, task, alias, output):
    """One export, asked for by the older alias: reported under optimum's name, with its output."""
    from ia3tools.tasks import task_named

    assert task_named(alias) == task_named(task) and task_named(task).optimum == task
    out = tmp_path / alias
    result = cli_run("export-onnx", FIXTURES / arch / "base", "-o", out, "--task", alias, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["task"] == task
    assert [o.name for o in session(out).get_outputs()] == [output]


def test_help_lists_optimums_task_names():
    help_text = cli_run("export-onnx", "--help").output
    for name in ("text-generation", "text2text-generation", "text-classification", "token-classification",
                 "feature-extraction", "image-classification", "causal-lm", "sequence-classification"):
        assert name in help_text, name
    bad = cli_run("export-onnx", FIXTURES / "llama" / "base", "-o", "x", "--task", "translation")
    assert bad.exit_code == 2


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), ("max", True),
                                                (["cls", "mean"], False)])
def test_sentence_transformers_embeddings(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer
    from tiny import save_sentence_model

    model_dir = save_sentence_model(tmp_path, pooling, normalize)
    out = tmp_path / "onnx"
    result = cli_run("export-onnx", model_dir, "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "feature-extraction"
    assert set(report["parity"]["outputs"]) == {"last_hidden_state", "sentence_embedding"}
    for name in ("modules.json", "1_Pooling/config.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert (out / "2_Normalize").is_dir() is normalize
    st = SentenceTransformer(str(model_dir), device="cpu")
    expected = st.encode(TEXTS_A + TEXTS_B, convert_to_numpy=True)
    feeds = dict(st.tokenizer(TEXTS_A + TEXTS_B, padding=True, return_tensors="np"))
    sess = session(out)
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    names = [i.name for i in sess.get_inputs()]
    _, embedding = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    assert embedding.shape == expected.shape
    np.testing.assert_allclose(embedding, expected, atol=1e-5)


def test_an_unsupported_sentence_transformers_module_is_one_line(tmp_path):
    from tiny import save_sentence_model

    model_dir = save_sentence_model(tmp_path, "mean", False)
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "2_Dense").mkdir()
    out = tmp_path / "onnx"
    result = cli_run("export-onnx", model_dir, "-o", out)
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert "2_Dense (Dense) cannot be exported" in result.stderr and not out.exists()


def test_the_usage_example_in_the_docs_runs(bert_with_tokenizer, tmp_path, monkeypatch):
    """docs/export.md's onnxruntime example, run as written against an export of the BERT classifier."""
    import re

    base, adapter = bert_with_tokenizer
    assert cli_run("export-onnx", base, "--adapter", adapter, "-o", tmp_path / "onnx", "-q").exit_code == 0
    monkeypatch.chdir(tmp_path)
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "export.md").read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    namespace: dict = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 3)


def test_the_older_layout_with_the_transformer_in_a_subfolder(tmp_path):
    """Weights, config and tokenizer under 0_Transformer/, as older sentence-transformers saved them."""
    from sentence_transformers import SentenceTransformer
    from tiny import move_transformer_to_subfolder, save_sentence_model

    model_dir = move_transformer_to_subfolder(save_sentence_model(tmp_path, "mean", True))
    out = tmp_path / "onnx"
    result = cli_run("export-onnx", model_dir, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS_A, convert_to_numpy=True)
    from transformers import AutoTokenizer

    feeds = dict(AutoTokenizer.from_pretrained(out)(TEXTS_A, padding=True, return_tensors="np"))
    sess = session(out)
    _, embedding = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    np.testing.assert_allclose(embedding, expected, atol=1e-5)
