"""`ia3tools export-onnx` beside a plain `torch.onnx.export(dynamo=True)` + save (bench/plain_export.py)
of the same Llama-shaped checkpoints (bench/make_checkpoint.py, bf16): wall time of each whole
process and its peak RSS (/usr/bin/time), against the bytes of the exported float32 weights.

    python bench/export.py --params 0.5 1 2 --runs 1        # writes bench/out/export.json and export.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process, after a sync."""
    subprocess.run(["sync"], check=True)
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    return seconds, rss


def checkpoint(params: float) -> Path:
    path = OUT / f"llama-{params:g}b"
    if not (path / "base").exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), "--size-gb", str(2 * params), "--dtype",
                        "bf16", "-o", str(path)], check=True)
    return path / "base"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, nargs="+", default=[0.5, 1, 2], help="billions of parameters")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for params in args.params:
        base = checkpoint(params)
        results: dict[str, list[tuple[float, int]]] = {"plain": [], "ia3tools": []}
        weights = 0
        for _ in range(args.runs):
            for name in results:
                target = OUT / f"export-{name}"
                shutil.rmtree(target, ignore_errors=True)
                if name == "plain":
                    target.mkdir(parents=True)
                    cmd = [sys.executable, str(HERE / "plain_export.py"), str(base), str(target / "model.onnx")]
                else:
                    cmd = [sys.executable, "-m", "ia3tools", "export-onnx", str(base), "-o", str(target), "-q"]
                results[name].append(timed(cmd))
                if name == "ia3tools":
                    weights = (target / "model.onnx.data").stat().st_size
                shutil.rmtree(target, ignore_errors=True)
        row = {"params_b": params, "weights_bytes": weights}
        for name, runs in results.items():
            row[f"{name}_s"] = round(statistics.median(t for t, _ in runs), 2)
            row[f"{name}_rss_bytes"] = max(r for _, r in runs)
        row["time_ratio"] = round(row["ia3tools_s"] / row["plain_s"], 3)
        row["rss_over_weights"] = round(row["ia3tools_rss_bytes"] / weights, 3)
        row["plain_rss_over_weights"] = round(row["plain_rss_bytes"] / weights, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (OUT / "export.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, OUT / "export.png")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["params_b"] for r in rows]
    for name, style in (("plain", "o--"), ("ia3tools", "s-")):
        left.plot(x, [r[f"{name}_s"] for r in rows], style, label=name)
        right.plot(x, [r[f"{name}_rss_bytes"] / r["weights_bytes"] for r in rows], style, label=name)
    right.axhline(1.3, color="grey", lw=0.8, ls=":", label="target 1.3x")
    left.set(xlabel="parameters (billions)", ylabel="wall time (s)", title="export + save (+ parity for ia3tools)")
    right.set(xlabel="parameters (billions)", ylabel="peak RSS / exported weights", title="peak memory")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
