"""Every command's --json output, success and failure, validates against docs/schema.json, and
failures print the envelope on stdout and exactly one line on stderr."""

import json

import jsonschema
import pytest
from conftest import FIXTURES, ROOT, cli_run, edit_json

SCHEMA = json.loads((ROOT / "docs" / "schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")


def envelope(result, command: str, ok: bool) -> dict:
    doc = json.loads(result.stdout)
    errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: e.path)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert doc["command"] == command and doc["ok"] is ok
    assert result.exit_code == (0 if ok else 1), result.output
    return doc


def test_the_schema_itself_is_valid():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_successes(tmp_path):
    envelope(cli_run("inspect", LLAMA[1], "--json"), "inspect", True)
    doc = envelope(cli_run("inspect", LLAMA[0], "--json"), "inspect", True)
    assert doc["kind"] == "checkpoint" and doc["sharded"] is True
    envelope(cli_run("check", *LLAMA, "--json"), "check", True)
    dry = envelope(cli_run("merge", *LLAMA, "--dry-run", "--json"), "merge", True)
    assert dry["plan"]["folds"] and dry["output"] is None
    merged = envelope(cli_run("merge", *LLAMA, "-o", tmp_path / "m", "--json"), "merge", True)
    assert merged["plan"] is None and merged["seconds"] > 0
    envelope(cli_run("verify", *LLAMA, tmp_path / "m", "--json"), "verify", True)
    blend = envelope(cli_run("blend", LLAMA[1], LLAMA[1], "-w", "0.6", "0.6", "-o", tmp_path / "b", "--json"),
                     "blend", True)
    assert [w["code"] for w in blend["warnings"]] == ["weights-sum"]
    extracted = envelope(cli_run("extract", LLAMA[0], tmp_path / "m", "-o", tmp_path / "x", "--json"), "extract", True)
    assert {m["scales"] for m in extracted["modules"]} == {"outputs", "inputs"}
    envelope(cli_run("diff", LLAMA[0], LLAMA[0], "--json"), "diff", True)
    bert = FIXTURES / "bert-cls"
    heads = envelope(cli_run("check", bert / "base", bert / "adapter", "--json"), "check", True)
    assert {h["replaces"] for h in heads["heads"]} == {None}


def test_findings_are_not_ok(fixture_copy, tmp_path):
    base, adapter = fixture_copy("llama")
    assert cli_run("merge", base, adapter, "-o", tmp_path / "m", "-q").exit_code == 0
    edit_json(adapter / "adapter_config.json", target_modules=["k_proj", "v_proj", "down_proj", "q_prj"])
    doc = envelope(cli_run("check", base, adapter, "--json"), "check", False)
    assert doc["errors"][0]["code"] == "unmatched-target"
    other = FIXTURES / "gpt2"
    assert cli_run("merge", other / "base", other / "adapter", "-o", tmp_path / "g", "-q").exit_code == 0
    doc = envelope(cli_run("verify", *LLAMA, tmp_path / "g", "--json"), "verify", False)
    assert {d["problem"] for d in doc["differences"]} == {"missing", "extra"}
    doc = envelope(cli_run("diff", LLAMA[0], tmp_path / "m", "--json"), "diff", False)
    assert {d["problem"] for d in doc["differences"]} == {"values"} and doc["keys"]
    doc = envelope(cli_run("diff", LLAMA[1], other / "adapter", "--json"), "diff", False)
    assert {"only-in-a", "only-in-b"} <= {d["problem"] for d in doc["differences"]}


@pytest.mark.parametrize("args, command, code", [
    (["inspect", "/no/such"], "inspect", "not-found"),
    (["check", LLAMA[0], "/no/such"], "check", "not-found"),
    (["merge", FIXTURES / "gpt2" / "base", LLAMA[1], "-o", "{tmp}/m"], "merge", "misfit"),
    (["merge", *LLAMA, "-o", "{tmp}"], "merge", "output-exists"),
    (["verify", *LLAMA, "/no/such"], "verify", "not-found"),
    (["blend", LLAMA[1], FIXTURES / "gpt2" / "adapter", "-w", "0.5", "0.5", "-o", "{tmp}/b"], "blend", "blend"),
    (["export-onnx", LLAMA[1], "-o", "{tmp}/x"], "export-onnx", "format"),
    (["extract", LLAMA[0], LLAMA[0], "-o", "{tmp}/x"], "extract", "extract"),
    (["diff", LLAMA[0], "/no/such"], "diff", "not-found"),
])
def test_failures_print_the_envelope_and_one_line(tmp_path, args, command, code):
    result = cli_run(*[str(a).replace("{tmp}", str(tmp_path)) for a in args], "--json")
    doc = envelope(result, command, False)
    assert doc["error"]["code"] == code and doc["error"]["message"]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert doc["error"].get("file", "") in lines[0]


# An export's envelope is validated where the exports are made (test_export_onnx, test_runtime_adapters).
