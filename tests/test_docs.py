import re

from click.testing import CliRunner
from conftest import ROOT

from ia3tools.cli import cli


def test_every_command_has_help_and_a_docs_entry():
    docs = (ROOT / "docs" / "commands.md").read_text()
    assert cli.commands
    for name, command in cli.commands.items():
        assert command.help and len(command.help.strip()) > 20, name
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
        assert re.search(rf"^## ia3tools {re.escape(name)}$", docs, re.M), f"docs/commands.md lacks {name}"


def test_readme_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    """docs/api.md's examples, run in order in one namespace, from a directory like the repository's."""
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "adapter 6" in printed and "not-found" in printed and (tmp_path / "out" / "onnx" / "model.onnx").exists()


def test_the_api_names_what_it_exports():
    import ia3tools

    assert set(ia3tools.__all__) == set(ia3tools._API) | {"__version__"}
    for name in ("inspect", "check", "merge", "verify", "blend", "extract", "diff", "export_onnx"):
        assert callable(getattr(ia3tools, name)), name
    assert (ROOT / "ia3tools" / "py.typed").exists()


def test_runtime_adapters_serving_example_runs(tmp_path, monkeypatch):
    """docs/runtime-adapters.md: its commands, then its serving code; each adapter's answers are
    the merged model's (transformers), and no adapter gives the base's."""
    import shlex

    import numpy as np
    import torch
    from conftest import cli_run
    from transformers import LlamaForCausalLM

    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "runtime-adapters.md").read_text()
    commands = re.findall(r"^\$ ia3tools (.*)$", text, re.M)
    assert len(commands) == 3
    for command in commands:
        result = cli_run(*shlex.split(command), "-q")
        assert result.exit_code == 0, (command, result.output)
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len([line for line in block.splitlines() if line.strip()]) <= 15
    namespace: dict = {}
    exec(compile(block, "docs/runtime-adapters.md", "exec"), namespace)
    texts = ["w3 w4 w5 w6", "w7 w8"]
    for adapter, source in (("adapter", "fixtures/llama/adapter"), ("softer", "out/softer"), (None, None)):
        model_dir = "fixtures/llama/base"
        if source:
            model_dir = f"out/merged-{adapter}"
            assert cli_run("merge", "fixtures/llama/base", source, "-o", model_dir, "--dtype", "fp32", "-q").exit_code == 0
        feed = namespace["tokenizer"](texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(
                input_ids=feed["input_ids"], attention_mask=feed["attention_mask"]).logits.numpy()
        got = namespace["serve"](texts, adapter)
        keep = feed["attention_mask"].numpy().astype(bool)
        np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=0)
