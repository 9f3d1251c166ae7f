import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))
sys.path.insert(0, str(FIXTURES / "bad"))


def st_bytes(header, data: bytes = b"") -> bytes:
    """A safetensors file built byte by byte: 8-byte little-endian length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def fixture_copy(tmp_path):
    """Copy a checked-in fixture pair into tmp_path so a test may damage it."""

    def copy(name: str) -> tuple[Path, Path]:
        dest = tmp_path / name
        shutil.copytree(FIXTURES / name, dest)
        return dest / "base", dest / "adapter"

    return copy


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


_pairs = {}


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Build (once per session) a base + adapter for an architecture with tiny random weights."""

    def build(arch: str, **kwargs) -> tuple[Path, Path]:
        key = (arch, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in _pairs:
            from tiny import save_pair

            root = tmp_path_factory.mktemp(arch)
            _pairs[key] = save_pair(root, arch, **kwargs)
        return _pairs[key]

    return build


def cli_run(*args):
    """Run the command line in-process; arguments may be paths."""
    from click.testing import CliRunner

    from ia3tools.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, *names, out=None, code=1):
    """A bad input: ``code``, exactly one ``Error:`` line on stderr naming each of ``names``, no
    traceback, nothing at ``out`` and no staging left beside it."""
    from ia3tools.publish import MARK

    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert "Traceback" not in result.output
    if out is not None:
        out = Path(out)
        assert not os.path.lexists(out), f"{out} exists"
        if out.parent.exists():
            assert [p for p in os.listdir(out.parent) if MARK in p] == []
    return lines[0]


def weight_files(directory) -> list[Path]:
    """A merged directory's files but its model card (which names the output path and command)."""
    return sorted(p for p in Path(directory).iterdir() if p.name != "README.md")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo="someorg/tiny-llama", source=None):
    """A Hugging Face hub cache holding ``repo`` as huggingface_hub lays it out: blobs, a snapshot of
    symlinks into them, and refs/main naming the snapshot."""
    source = source or FIXTURES / "llama" / "base"
    org, name = repo.split("/")
    repo_dir = root / f"models--{org}--{name}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / COMMIT
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snapshot / f.name).symlink_to(f"../../blobs/{digest}")
    return repo_dir
