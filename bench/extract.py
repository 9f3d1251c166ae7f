"""`ia3tools extract` beside `ia3tools verify` on the same pair, and `ia3tools diff` beside reading
both checkpoints (`cat A/* B/* > /dev/null`), on Llama-shaped checkpoints (bench/make_checkpoint.py:
bf16, fp16 or fp32, with its IA3 adapter merged): wall time of each whole process (median of
``--runs``) with a warm page cache (as right after a merge) and a cold one (the inputs evicted with
posix_fadvise), and peak RSS.
Then, in-process, how wide the recovered intervals are (in float32 steps) and how many vector
elements needed the float32 step search after their first proof.

    python bench/extract.py --size-gb 1 --dtypes bf16 fp16 fp32 --runs 3   # writes bench/out/extract.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))
from export import timed  # noqa: E402  (bench/export.py: wall time and peak RSS of one process)


def pair(size_gb: float, dtype: str) -> tuple[Path, Path, Path]:
    root = OUT / f"extract-{size_gb:g}gb-{dtype}"
    if not (root / "base").exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), "--size-gb", str(size_gb), "--dtype", dtype,
                        "-o", str(root)], check=True)
    if not (root / "merged").exists():
        subprocess.run([sys.executable, "-m", "ia3tools", "merge", str(root / "base"), str(root / "adapter"), "-o",
                        str(root / "merged"), "-q", "--no-fsync"], cwd=ROOT, check=True)
    return root / "base", root / "adapter", root / "merged"


def evict(*directories: Path) -> None:
    """Drop the directories' files from the page cache (clean pages; timed() syncs first)."""
    subprocess.run(["sync"], check=True)
    for d in directories:
        for f in d.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def median_of(cmd: list[str], runs: int, inputs: tuple[Path, ...], before=None) -> dict:
    """Median wall time and peak RSS with a warm page cache (after one untimed run) and a cold one
    (the inputs evicted before each run)."""
    result = {}
    for cache in ("warm", "cold"):
        samples = []
        for i in range(runs + (cache == "warm")):
            if before:
                before()
            if cache == "cold":
                evict(*inputs)
            sample = timed(cmd)
            if cache == "cold" or i > 0:
                samples.append(sample)
        result[cache] = {"median_s": round(statistics.median(s for s, _ in samples), 3),
                         "peak_rss_mb": round(max(r for _, r in samples) / 1e6, 1)}
    return result


def interval_widths(base: Path, merged: Path, adapter: Path) -> dict:
    """Widths of the fitted intervals in float32 steps, how many hold the trained value (from the
    adapter that was merged), and the elements the step search moved."""
    import ia3tools.extraction as ex
    from ia3tools.commands.extract import extract
    from ia3tools.formats import open_checkpoint
    from ia3tools.formats.adapter import read_adapter

    trained = read_adapter(adapter).vectors
    moved, widths, holding = [0], [], [0]
    repair = ex._repair

    def counting(vector, bad, check):
        moved[0] += int(bad.sum())
        return repair(vector, bad, check)

    ex._repair = counting
    target = OUT / "extract-widths"
    shutil.rmtree(target, ignore_errors=True)
    report = extract(base, merged, target)
    ex._repair = repair
    b, m = open_checkpoint(base), open_checkpoint(merged)
    for module in report.modules:
        ref = b.tensors[f"{module.module}.weight"]
        axis = 1 if module.scales == "inputs" else 0
        w, mm = (np.frombuffer(c.read_bytes(ref.name), ex.DTYPES[ref.dtype].numpy).reshape(ref.shape) for c in (b, m))
        low, high, _ = ex.intervals(w, mm, ref.dtype, 1 - axis)
        mid = np.abs((low + high) / 2).astype(np.float32)
        widths.append((high - low) / np.spacing(mid).astype(np.float64))
        true = next(v for k, v in trained.items() if k.endswith(module.module)).astype(np.float64).reshape(-1)
        holding[0] += int(np.count_nonzero((low <= true) & (true <= high)))
    steps = np.concatenate(widths)
    shutil.rmtree(target, ignore_errors=True)
    return {"elements": int(steps.size), "hold_the_trained_value": holding[0], "moved_by_search": moved[0],
            "width_float32_steps": {"min": float(steps.min()), "median": float(np.median(steps)),
                                    "max": float(steps.max())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ia3 = [sys.executable, "-m", "ia3tools"]
    rows = []
    for dtype in args.dtypes:
        base, adapter, merged = pair(args.size_gb, dtype)
        out = OUT / "extract-out"
        files = sorted(str(p) for d in (base, merged) for p in d.glob("*.safetensors"))
        inputs = (base, adapter, merged)
        row = {"dtype": dtype, "size_gb": args.size_gb,
               "read_both": median_of(["sh", "-c", f"cat {' '.join(files)} > /dev/null"], args.runs, inputs),
               "verify": median_of([*ia3, "verify", str(base), str(adapter), str(merged), "-q"], args.runs, inputs),
               "extract": median_of([*ia3, "extract", str(base), str(merged), "-o", str(out), "-q"], args.runs, inputs,
                                    before=lambda: shutil.rmtree(out, ignore_errors=True)),
               "diff": median_of(["sh", "-c", f"{' '.join(ia3)} diff {base} {merged} -q > /dev/null; test $? -le 1"],
                                 args.runs, inputs)}
        done = subprocess.run([*ia3, "verify", str(base), str(out), str(merged), "-q"], cwd=ROOT)
        row["round_trip_identical"] = done.returncode == 0
        for cache in ("warm", "cold"):
            row[f"extract_over_verify_{cache}"] = round(row["extract"][cache]["median_s"] /
                                                        row["verify"][cache]["median_s"], 2)
            row[f"diff_over_read_{cache}"] = round(row["diff"][cache]["median_s"] / row["read_both"][cache]["median_s"], 2)
        row["intervals"] = interval_widths(base, merged, adapter)
        rows.append(row)
        print(json.dumps(row, indent=2), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    (OUT / "extract.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
