"""Streams and --quiet on every command: results on stdout, warnings and progress on stderr;
-q leaves out progress and summaries, never results, warnings or errors."""

import pytest
from conftest import FIXTURES, cli_run, edit_json

LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("streams") / "merged"
    assert cli_run("merge", *LLAMA, "-o", out, "-q").exit_code == 0
    return out


def test_summaries_go_with_quiet_results_stay(merged, tmp_path):
    loud, quiet = cli_run("check", *LLAMA), cli_run("check", *LLAMA, "-q")
    assert loud.stdout.startswith("ok: 6 vectors fit") and quiet.stdout == "" and quiet.exit_code == 0
    loud, quiet = cli_run("verify", *LLAMA, merged), cli_run("verify", *LLAMA, merged, "-q")
    assert loud.stdout.startswith("identical: 21 tensors") and quiet.stdout == "" and quiet.exit_code == 0
    table = cli_run("inspect", LLAMA[1], "-q")
    assert table.stdout == cli_run("inspect", LLAMA[1]).stdout and "model.layers.*.mlp.down_proj" in table.stdout
    dry = cli_run("merge", *LLAMA, "--dry-run", "-q")
    assert "dry run: would write" in dry.stdout  # the plan is the result of a dry run
    assert cli_run("merge", *LLAMA, "-o", tmp_path / "m", "-q").stdout == ""
    assert cli_run("merge", *LLAMA, "-o", tmp_path / "m2").stdout.startswith("merged 6 tensors of 21")


def test_warnings_go_to_stderr_even_when_quiet(tmp_path):
    for i, extra in enumerate(([], ["-q"], ["--json"])):
        result = cli_run("blend", LLAMA[1], LLAMA[1], "-w", "0.6", "0.6", "-o", tmp_path / f"b{i}", *extra)
        assert result.exit_code == 0
        assert result.stderr == "warning: linear weights sum to 1.2, not 1: every module is rescaled\n"
        assert ("blended 6 modules" in result.stdout) is (extra == [])


def test_problems_are_results_even_when_quiet(fixture_copy):
    base, adapter = fixture_copy("llama")
    edit_json(adapter / "adapter_config.json", target_modules=["k_proj", "v_proj", "down_proj", "q_prj"])
    result = cli_run("check", base, adapter, "-q")
    assert result.exit_code == 1
    assert result.stdout == "error: target_modules entry 'q_prj' matches no module of the base\n"


def test_export_progress_is_stderr_and_quiet_silences_it(merged, tmp_path, monkeypatch):
    loud = cli_run("export-onnx", merged, "-o", tmp_path / "a", "--no-parity")
    assert loud.exit_code == 0
    phases = [line.split(" ")[0] for line in loud.stderr.splitlines()]
    assert phases == ["loaded", "exported", "saved"]  # parity is its fourth line, when it runs
    assert "loaded text-generation in " in loud.stderr and " s; inputs input_ids, attention_mask" in loud.stderr
    assert loud.stdout.startswith("exported ")

    import ia3tools.exporting.pipeline as pipeline
    from ia3tools.errors import ExportError

    def first_phase_then_fail(*args):  # the export's progress callback is its 7th argument
        args[6]("loaded text-generation in 0.1 s")
        raise ExportError("stopped after the first phase")

    monkeypatch.setattr(pipeline, "run_export", first_phase_then_fail)
    quiet = cli_run("export-onnx", merged, "-o", tmp_path / "b", "--no-parity", "-q")
    assert quiet.exit_code == 1 and quiet.stdout == ""
    assert quiet.stderr == "Error: stopped after the first phase\n"  # the error only: no progress
    shown = cli_run("export-onnx", merged, "-o", tmp_path / "c", "--no-parity")  # the same, without -q
    assert shown.stderr.splitlines() == ["loaded text-generation in 0.1 s", "Error: stopped after the first phase"]
