import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))


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
