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
    for name in ("inspect", "check", "merge", "verify", "blend", "export_onnx"):
        assert callable(getattr(ia3tools, name)), name
    assert (ROOT / "ia3tools" / "py.typed").exists()
