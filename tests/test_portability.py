"""Platform gaps, simulated here on Linux: each system call ia3tools prefers has a fallback, and
the output is the same bytes without it. Messages print in any console encoding."""

import os
import subprocess
import sys

import pytest
from conftest import FIXTURES, ROOT, cli_run, weight_files

from ia3tools import atomic, publish
from ia3tools.formats import files

LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")
GPT2 = (FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """What merge writes with every preferred call available."""
    out = tmp_path_factory.mktemp("reference")
    for name, pair in (("llama", LLAMA), ("gpt2", GPT2)):
        assert cli_run("merge", *pair, "-o", out / name, "-q").exit_code == 0
    return out


def same_merge(reference, tmp_path):
    for name, pair in (("llama", LLAMA), ("gpt2", GPT2)):
        result = cli_run("merge", *pair, "-o", tmp_path / name, "-q")
        assert result.exit_code == 0, result.output
        for f in weight_files(reference / name):
            assert (tmp_path / name / f.name).read_bytes() == f.read_bytes(), f.name
        assert cli_run("verify", *pair, tmp_path / name).exit_code == 0


@pytest.mark.parametrize("missing", ["pread+pwrite", "posix_fallocate", "posix_fadvise", "copy_file_range",
                                     "renameat2", "rename-exchange"])
def test_each_fallback_writes_the_same_bytes(reference, tmp_path, monkeypatch, missing):
    if missing == "pread+pwrite":  # Windows: no positioned I/O
        monkeypatch.setattr(files, "pread", files._pread_fallback)
        monkeypatch.setattr(files, "pwrite", files._pwrite_fallback)
    elif missing == "renameat2":  # an old kernel or a filesystem without RENAME_NOREPLACE/EXCHANGE
        monkeypatch.setattr(atomic, "rename_call", lambda name, a, b, flags: None)
    elif missing == "rename-exchange":  # --force replaces the output through the two-rename fallback
        monkeypatch.setattr(publish, "exchange", lambda a, b: False)
        (tmp_path / "llama").mkdir()
        (tmp_path / "gpt2").mkdir()
        for name, pair in (("llama", LLAMA), ("gpt2", GPT2)):
            assert cli_run("merge", *pair, "-o", tmp_path / name, "-q", "--force").exit_code == 0
        monkeypatch.undo()
        for name in ("llama", "gpt2"):
            for f in weight_files(reference / name):
                assert (tmp_path / name / f.name).read_bytes() == f.read_bytes()
        return
    else:
        monkeypatch.delattr(os, missing)
    same_merge(reference, tmp_path)


def test_no_process_is_probed_with_kill():
    """os.kill(pid, 0) terminates the process on Windows: stale runs are told by their lock."""
    source = (ROOT / "ia3tools" / "publish.py").read_text()
    assert "os.kill" not in source and "getpid" not in source


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_messages_print_in_any_console_encoding(tmp_path, encoding):
    env = dict(os.environ, PYTHONIOENCODING=encoding)
    assert cli_run("merge", *LLAMA, "-o", tmp_path / "m", "-q").exit_code == 0
    done = subprocess.run([sys.executable, "-m", "ia3tools", "verify", *map(str, LLAMA), str(tmp_path / "m")],
                          cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0 and b"Traceback" not in done.stderr
    assert done.stdout.decode(encoding).startswith("identical: 21 tensors (6 folded) match base \\u2299 adapter")
    hostile = tmp_path / "sn\u00f8w\u2603"
    done = subprocess.run([sys.executable, "-m", "ia3tools", "inspect", str(hostile)], cwd=ROOT, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and b"no such file or directory" in done.stderr
