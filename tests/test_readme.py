"""The README quick start is a transcript: replay each command and compare with what it shows."""

import re
import shlex

from click.testing import CliRunner
from conftest import ROOT

from ia3tools.cli import cli


def transcript():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"What `make demo` runs, and what it prints[^\n]*\n\n```\n(.*?)```", readme, re.S).group(1)
    steps, current = [], None
    for line in block.splitlines():
        if line.startswith("$ ia3tools "):
            current = [shlex.split(line[len("$ ia3tools "):]), []]
            steps.append(current)
        else:
            current[1].append(line)
    return steps


def _float_noise(lines: list[str]) -> list[str]:
    """Parity errors may differ in their last digits between CPUs; everything else must match."""
    return [re.sub(r"\d\.\d+e-\d+", "<small>", line) for line in lines]


def test_readme_transcript_is_true(tmp_path, monkeypatch):
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    steps = transcript()
    assert [args[0] for args, _ in steps] == ["inspect", "check", "merge", "verify", "extract", "verify", "export-onnx"]
    for args, expected in steps:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        got = result.stdout.rstrip("\n").splitlines()
        if args[0] == "export-onnx":
            got, expected = _float_noise(got), _float_noise(expected)
        assert got == expected, args


def test_makefile_demo_runs_the_transcript_commands():
    makefile = (ROOT / "Makefile").read_text()
    for args, _ in transcript():
        assert "ia3tools " + " ".join(args).replace("demo-out", "$(DEMO)") in makefile
