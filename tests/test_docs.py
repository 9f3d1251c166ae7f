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
