"""Hostile inputs (fixtures/bad/make_bad.py): every case through the CLI gets exit 1, one line on
stderr naming the file (and tensor or module), no traceback, nothing at the output path, the
previous output intact under --force, and no staging leftovers.

Covered elsewhere: output inside an input and existing output (test_merge_errors), disk full,
SIGKILL and SIGINT (test_merge_errors, slow), ONNX external data names (test_export_onnx)."""

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ia3tools.cli import cli
from ia3tools.errors import Ia3Error
from ia3tools.publish import MARK as STAGING_MARK

sys.path.insert(0, str(ROOT / "fixtures" / "bad"))
import make_bad  # noqa: E402

CORPUS = Path(tempfile.mkdtemp(prefix="ia3tools-bad-"))
atexit.register(shutil.rmtree, CORPUS, ignore_errors=True)
CASES = {c.name: c for c in make_bad.build(CORPUS)}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def leftovers(directory: Path):
    return [p.name for p in directory.iterdir() if STAGING_MARK in p.name]


def test_corpus_covers_the_listed_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_refuses_hostile_input(name, tmp_path):
    case = CASES[name]
    base, adapter = CORPUS / name / "base", CORPUS / name / "adapter"
    out = tmp_path / "out"
    result = run("merge", base, adapter, "-o", out, "-q")
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    if case.warning:
        assert result.exit_code == 0, result.output
        assert len(lines) == 1 and lines[0].startswith("warning: ") and case.expect in lines[0]
        return
    assert result.exit_code == case.exit_code, result.output
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and case.expect in lines[0] and case.names in lines[0], lines[0]
    assert not out.exists() and leftovers(tmp_path) == []

    out.mkdir()
    (out / "keep.txt").write_text("previous")
    again = run("merge", base, adapter, "-o", out, "-q", "--force")
    assert again.exit_code == 1 and again.stderr.strip() == lines[0]
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "previous"
    assert leftovers(tmp_path) == []
    if name == "bin-pickle-runs-code":
        assert not (CORPUS / name / "PWNED").exists()


def test_check_reports_nan_vectors():
    result = run("check", CORPUS / "nan-in-vector" / "base", CORPUS / "nan-in-vector" / "adapter")
    assert result.exit_code == 1
    assert "error: layer.q: vector has 1 NaN and 0 Inf entries" in result.stdout.splitlines()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights=st.binary(max_size=200), config=st.one_of(
    st.binary(max_size=120),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                     st.sampled_from(["peft_type", "target_modules", "feedforward_modules", "fan_in_fan_out",
                                      "modules_to_save", "task_type", "exclude_modules"]), kids, max_size=7),
                 max_leaves=12).map(lambda d: json.dumps(d).encode())))
def test_fuzz_adapter_reader_only_raises_typed_errors(tmp_path, weights, config):
    from ia3tools.formats import read_adapter

    (tmp_path / "adapter_config.json").write_bytes(config)
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    try:
        read_adapter(tmp_path).close()
    except Ia3Error:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.fixed_dictionaries({
    "peft_type": st.just("IA3"),
    "target_modules": st.one_of(st.lists(st.text(max_size=6), max_size=3), st.text(max_size=8)),
    "feedforward_modules": st.one_of(st.lists(st.text(max_size=6), max_size=3), st.text(max_size=8)),
    "fan_in_fan_out": st.booleans(),
    "modules_to_save": st.one_of(st.none(), st.lists(st.text(max_size=6), max_size=2)),
}))
def test_fuzz_configs_against_a_base_only_raise_typed_errors(tmp_path, config):
    """Arbitrary (well-formed) configs planned against a real base: findings or typed errors."""
    from ia3tools import check

    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "llama" / "adapter", adapter, dirs_exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    try:
        check(FIXTURES / "llama" / "base", adapter)
    except Ia3Error:
        pass


def test_every_written_directory_is_validated_before_it_is_published(tmp_path, monkeypatch):
    from ia3tools.commands import blend, merge

    seen = []

    def recording(real):
        def validate(directory):
            seen.append((directory.name, [p.name for p in tmp_path.iterdir()]))
            real(directory)

        return validate

    monkeypatch.setattr(merge, "validate_checkpoint", recording(merge.validate_checkpoint))
    monkeypatch.setattr(blend, "validate_adapter", recording(blend.validate_adapter))
    llama = FIXTURES / "llama"
    assert run("merge", llama / "base", llama / "adapter", "-o", tmp_path / "merged", "-q").exit_code == 0
    assert run("blend", llama / "adapter", llama / "adapter", "-w", "0.5", "0.5", "-o", tmp_path / "blend").exit_code == 0
    assert len(seen) == 2
    for (staging, present), published in zip(seen, ["merged", "blend"]):
        assert STAGING_MARK in staging and published not in present  # validated before the rename


def test_a_write_that_does_not_validate_is_never_published(tmp_path, monkeypatch):
    from ia3tools import write

    real = write.build_header

    def lying_header(tensors, metadata):  # claims one byte more data than is written
        raw = real(tensors, metadata)
        doc = json.loads(raw[8:])
        last = list(doc)[-1]
        doc[last]["data_offsets"][1] += 1
        body = json.dumps(doc).encode()
        return len(body).to_bytes(8, "little") + body

    monkeypatch.setattr(write, "build_header", lying_header)
    out = tmp_path / "merged"
    result = run("merge", FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", "-o", out)
    assert result.exit_code == 1 and "model.safetensors" in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []
