"""Publishing never loses data: no-replace publishes, the --force fallback's crash recovery,
stale-run detection by lock (never by PID), and SIGINT/SIGTERM/SIGHUP cleanup. Faults are injected
at named steps (tests/faults.py), in real processes where the fault is a kill or a signal."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES, ROOT

from ia3tools import atomic, publish
from ia3tools.cli import cli
from ia3tools.publish import MARK

LLAMA = (FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")
FAULTS = Path(__file__).with_name("faults.py")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if MARK in p.name)


def kinds(directory: Path) -> set[str]:
    return {name.rpartition(".")[2] for name in leftovers(directory)}


def with_faults(steps: str, *args, wait=True, **popen):
    cmd = [sys.executable, str(FAULTS), steps, "--", *[str(a) for a in args]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    if wait:
        proc.communicate(timeout=120)
    return proc


def old_output(out: Path) -> None:
    out.mkdir()
    (out / "old.txt").write_text("the only copy")


# --- no-replace publish -----------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["renameat2", "no-renameat2"])
def test_an_output_that_appears_during_the_run_is_never_replaced(tmp_path, monkeypatch, platform):
    from ia3tools.commands import merge

    if platform == "no-renameat2":  # the check-then-rename fallback
        monkeypatch.setattr(atomic, "rename_call", lambda name, a, b, flags: None)
    out = tmp_path / "merged"
    real = merge.validate_checkpoint

    def another_run_publishes_first(directory):
        real(directory)
        out.mkdir()
        (out / "theirs.txt").write_text("the other run's output")

    monkeypatch.setattr(merge, "validate_checkpoint", another_run_publishes_first)
    result = run("merge", *LLAMA, "-o", out, "-q")
    assert result.exit_code == 1
    assert result.stderr == (f"Error: {out}: output appeared while this run was working (another process wrote it); "
                             "it was left as it is\n")
    assert os.listdir(out) == ["theirs.txt"] and leftovers(tmp_path) == []


def test_two_concurrent_merges_to_one_output(tmp_path):
    """A real second process, paused before it publishes, while this one publishes first."""
    out, marker = tmp_path / "merged", tmp_path / "paused"
    first = with_faults(f"pause-before-publish={marker}", "merge", *LLAMA, "-o", out, "-q", wait=False)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    assert marker.exists(), first.communicate()
    live = leftovers(tmp_path)
    assert {"new", "lock"} <= kinds(tmp_path)
    second = run("merge", *LLAMA, "-o", out, "-q")  # must not take the paused run's staging as stale
    assert second.exit_code == 0, second.output
    assert set(live) <= set(leftovers(tmp_path))
    Path(f"{marker}.go").touch()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 1
    assert "output appeared while this run was working" in err and len(err.splitlines()) == 1
    assert (out / "model.safetensors.index.json").exists() and leftovers(tmp_path) == []


def test_force_checks_the_output_is_still_the_one_it_found(tmp_path, monkeypatch):
    from ia3tools.commands import merge

    out = tmp_path / "merged"
    old_output(out)
    real = merge.validate_checkpoint

    def replaced_meanwhile(directory):
        real(directory)
        os.rename(out, tmp_path / "moved")
        old_output(out)

    monkeypatch.setattr(merge, "validate_checkpoint", replaced_meanwhile)
    result = run("merge", *LLAMA, "-o", out, "-q", "--force")
    assert result.exit_code == 1 and "output was replaced by another process" in result.stderr
    assert os.listdir(out) == ["old.txt"] and leftovers(tmp_path) == []


# --- --force: every crash point leaves the old or the new output, or a restorable one -----------

@pytest.mark.slow
def test_force_fallback_killed_between_the_renames_is_restored_by_the_next_run(tmp_path):
    out = tmp_path / "merged"
    old_output(out)
    proc = with_faults("no-exchange,kill-after-move-aside", "merge", *LLAMA, "-o", out, "--force", "-q")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and kinds(tmp_path) == {"new", "old", "lock"}  # the old output, moved aside
    again = run("merge", *LLAMA, "-o", out, "-q")  # any run for OUT restores it, never deletes it
    assert again.exit_code == 1 and "output already exists" in again.stderr
    assert os.listdir(out) == ["old.txt"] and (out / "old.txt").read_text() == "the only copy"
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_force_fallback_killed_after_the_swap_keeps_the_new_output(tmp_path):
    out = tmp_path / "merged"
    old_output(out)
    proc = with_faults("no-exchange,kill-after-swap-in", "merge", *LLAMA, "-o", out, "--force", "-q")
    assert proc.returncode == -signal.SIGKILL
    assert (out / "model.safetensors.index.json").exists() and "old" in kinds(tmp_path)
    assert publish.recover(out) == []  # the old copy goes only because the new one is in place
    assert leftovers(tmp_path) == [] and not (out / "old.txt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("step, published", [("kill-after-exchange", True), ("kill-while-writing", False)])
def test_force_killed_elsewhere_keeps_one_output_and_the_next_run_cleans(tmp_path, step, published):
    out = tmp_path / "merged"
    old_output(out)
    proc = with_faults(step, "merge", *LLAMA, "-o", out, "--force", "-q")
    assert proc.returncode == -signal.SIGKILL
    assert (out / "model.safetensors.index.json").exists() is published and (out / "old.txt").exists() is not published
    assert kinds(tmp_path) == {"new", "lock"}  # after the exchange, .new holds the old output
    assert run("merge", *LLAMA, "-o", out, "-q", "--force").exit_code == 0
    assert leftovers(tmp_path) == [] and not (out / "old.txt").exists()


# --- stale runs are told by their lock, not by a PID ----------------------------------------------

def fake_leftover(out: Path, token: str, kinds=("new", "lock")) -> Path:
    base = out.parent / f"{publish._stem(out)}{token}"
    for kind in kinds:
        path = Path(f"{base}.{kind}")
        if kind == "lock":
            path.touch()
        else:
            path.mkdir()
            (path / "part.safetensors").write_bytes(b"partial")
    return base


def test_a_leftover_whose_lock_is_free_is_removed(tmp_path):
    out = tmp_path / "merged"
    fake_leftover(out, "deadbeefdeadbeef")
    fake_leftover(out, "0123456789abcdef", kinds=("new",))  # died before it created its lock
    assert run("merge", *LLAMA, "-o", out, "-q").exit_code == 0
    assert leftovers(tmp_path) == []


def test_a_leftover_whose_lock_is_held_is_kept_whatever_its_pid(tmp_path):
    """Held by another process (as a run in another PID namespace would hold it): never stale."""
    out = tmp_path / "merged"
    base = fake_leftover(out, "feedfacefeedface")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(base) + '.lock'!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert run("merge", *LLAMA, "-o", out, "-q").exit_code == 0
        assert Path(f"{base}.new").is_dir() and Path(f"{base}.lock").exists()
    finally:
        holder.kill()
        holder.wait()
    assert publish.recover(out) == [] and leftovers(tmp_path) == []  # its holder is gone now


# --- signals ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGINT, 130, "Error: interrupted"),
    (signal.SIGTERM, 143, "Error: interrupted (SIGTERM)"),
    (signal.SIGHUP, 129, "Error: interrupted (SIGHUP)"),
])
def test_signals_clean_up_like_ctrl_c(tmp_path, sig, code, line):
    step = {signal.SIGINT: "int", signal.SIGTERM: "term", signal.SIGHUP: "hup"}[sig] + "-while-writing"
    cmd = [sys.executable, str(FAULTS), step, "--", "merge", *map(str, LLAMA), "-o", str(tmp_path / "m"), "-q"]
    # As from a terminal: a run started in the background of a script inherits SIGINT ignored
    # (and then ignores Ctrl-C, as POSIX wants), so the child starts with the default disposition.
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == code and done.stderr == line + "\n" and done.stdout == ""
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_signals_during_the_renames_are_acted_on_after_them():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append("handled"))
    try:
        with publish._signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            got.append("renamed")
        assert got == ["renamed", "handled"]
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the output path ------------------------------------------------------------------------------

def test_an_output_in_a_directory_that_cannot_be_written(tmp_path, monkeypatch):
    real = publish.Lock.create

    def refused(path):  # what a read-only directory answers (root would not be refused here)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(publish.Lock, "create", refused)
    out = tmp_path / "ro" / "merged"
    result = run("merge", *LLAMA, "-o", out, "-q")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out}: cannot write the output: permission denied; nothing was written\n"
    assert not (tmp_path / "ro").exists()
    monkeypatch.setattr(publish.Lock, "create", real)


@pytest.mark.parametrize("length", [240, 255])
def test_long_output_names_fit_the_file_name_limit(tmp_path, monkeypatch, length):
    from ia3tools.commands import merge

    out = tmp_path / ("m" * length)
    seen = []
    real = merge.validate_checkpoint
    monkeypatch.setattr(merge, "validate_checkpoint",
                        lambda d: seen.extend(os.listdir(tmp_path)) or real(d))
    result = run("merge", *LLAMA, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert seen and all(len(os.fsencode(n)) <= 255 for n in seen) and leftovers(tmp_path) == []


def test_a_symlink_loop_as_the_output_or_its_parent(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for out in (loop, loop / "merged"):
        result = run("merge", *LLAMA, "-o", out, "-q")
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
        assert result.stderr.startswith(f"Error: {out}: ") and "symbolic link loop" in result.stderr


def test_messages_name_the_output_never_the_staging_directory(tmp_path, monkeypatch):
    from ia3tools import write

    real = write.build_header

    def lying_header(tensors, metadata):  # one byte more data than is written
        import json

        raw = real(tensors, metadata)
        doc = json.loads(raw[8:])
        doc[list(doc)[-1]]["data_offsets"][1] += 1
        body = json.dumps(doc).encode()
        return len(body).to_bytes(8, "little") + body

    monkeypatch.setattr(write, "build_header", lying_header)
    out = tmp_path / "merged"
    result = run("merge", FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", "-o", out)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {out / 'model.safetensors'}: tensor ")
    assert MARK not in result.stderr and leftovers(tmp_path) == []
