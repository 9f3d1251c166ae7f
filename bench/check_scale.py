"""How `ia3tools check` scales with the number of vectors: synthetic adapters of N vectors across a
backbone prefix (the adapter's names carry `model.`, the base's do not), timed as whole processes.

    python bench/check_scale.py --counts 1000 10000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def safetensors(tensors: dict[str, tuple[list[int], bytes]]) -> bytes:
    header, offset, data = {}, 0, []
    for name, (shape, raw) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data.append(raw)
    raw_header = json.dumps(header).encode()
    return struct.pack("<Q", len(raw_header)) + raw_header + b"".join(data)


def make_pair(root: Path, n: int) -> tuple[Path, Path]:
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    ones = struct.pack("<4f", 1, 1, 1, 1)
    (base / "model.safetensors").write_bytes(
        safetensors({f"layers.{i}.k.weight": ([2, 2], ones) for i in range(n)}))
    (adapter / "adapter_model.safetensors").write_bytes(
        safetensors({f"base_model.model.model.layers.{i}.k.ia3_l": ([2, 1], ones[:8]) for i in range(n)}))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": [], "fan_in_fan_out": False}))
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("vectors  check median (s)  min     max")
    for n in args.counts:
        with tempfile.TemporaryDirectory() as tmp:
            base, adapter = make_pair(Path(tmp), n)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "ia3tools", "check", str(base), str(adapter)], cwd=ROOT,
                               check=True, stdout=subprocess.DEVNULL)
                times.append(time.perf_counter() - started)
        print(f"{n:>7}  {statistics.median(times):>16.3f}  {min(times):.3f}  {max(times):.3f}")


if __name__ == "__main__":
    main()
