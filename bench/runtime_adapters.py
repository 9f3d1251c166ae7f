"""Runtime adapters against merged exports: one base exported with `--runtime-adapters A B` beside
the merged export of A, on a Llama-shaped checkpoint (bench/make_checkpoint.py, with its IA3
adapter; B is A blended to 0.6 strength). Measures file sizes, export time, onnxruntime latency per
run (median of ``--runs``, batch x sequence ``--shape``) with no adapter, with A, alternating A and B
every run (the cost of switching), and the merged export; and the peak RSS of a process that
loads one session and runs it (a merged export per adapter costs one such process each).

    python bench/runtime_adapters.py --params 0.5 --runs 20    # writes bench/out/runtime_adapters.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
IA3 = [sys.executable, "-m", "ia3tools"]


def timed_run(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    return round(time.perf_counter() - started, 1)


def prepare(params: float) -> dict:
    root = OUT / f"llama-{params:g}b"
    base, adapter = root / "base", root / "adapter"
    if not base.exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), "--size-gb", str(2 * params), "-o", str(root)],
                       check=True)  # bf16: two bytes per parameter
    softer, merged = root / "softer", root / "merged-rt"
    runtime, merged_onnx = root / "onnx-runtime", root / "onnx-merged"
    times = {}
    if not softer.exists():
        subprocess.run([*IA3, "blend", str(adapter), str(adapter), "--weights", "0.3", "0.3", "-o", str(softer), "-q"],
                       cwd=ROOT, check=True)
    if not merged.exists():
        subprocess.run([*IA3, "merge", str(base), str(adapter), "-o", str(merged), "-q", "--no-fsync"], cwd=ROOT,
                       check=True)
    if not runtime.exists():
        times["runtime_export_s"] = timed_run([*IA3, "export-onnx", str(base), "-o", str(runtime), "-q",
                                               "--runtime-adapters", str(adapter), str(softer)])
    if not merged_onnx.exists():
        times["merged_export_s"] = timed_run([*IA3, "export-onnx", str(merged), "-o", str(merged_onnx), "-q"])
    return {"runtime": runtime, "merged": merged_onnx, "adapters": [adapter.name, softer.name], "times": times}


def sizes(runtime: Path, merged: Path) -> dict:
    return {"runtime_model_bytes": sum(p.stat().st_size for p in runtime.glob("model.onnx*")),
            "merged_model_bytes": sum(p.stat().st_size for p in merged.glob("model.onnx*")),
            "adapter_bytes": {p.name: p.stat().st_size for p in sorted((runtime / "adapters").iterdir())}}


WORKER = r'''
import json, resource, statistics, sys, time
import numpy as np, onnxruntime as ort
path, mode, names, runs, batch, length = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
options = ort.SessionOptions(); options.log_severity_level = 3
started = time.perf_counter()
session = ort.InferenceSession(path + "/model.onnx", options, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - started
adapters = {}
for n in names if mode != "merged" else []:
    adapters[n] = ort.LoraAdapter(); adapters[n].Load(f"{path}/adapters/{n}.onnx_adapter")
rng = np.random.default_rng(0)
feed = {"input_ids": rng.integers(0, 1000, (batch, length)), "attention_mask": np.ones((batch, length), np.int64)}
def options_for(i):
    run = ort.RunOptions()
    if mode == "one": run.add_active_adapter(adapters[names[0]])
    if mode == "alternate": run.add_active_adapter(adapters[names[i % len(names)]])
    return run
for i in range(3): session.run(None, feed, options_for(i))
samples = []
for i in range(runs):
    run = options_for(i)
    t = time.perf_counter(); session.run(None, feed, run); samples.append(time.perf_counter() - t)
print(json.dumps({"load_s": round(load_s, 2), "median_ms": round(1000 * statistics.median(samples), 1),
                  "min_ms": round(1000 * min(samples), 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
'''


def latency(path: Path, mode: str, names: list[str], runs: int, batch: int, length: int) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, str(path), mode, ",".join(names), str(runs), str(batch),
                           str(length)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--shape", type=int, nargs=2, default=[1, 128], metavar=("BATCH", "SEQUENCE"))
    args = ap.parse_args()
    made = prepare(args.params)
    result = {"params_b": args.params, "shape": args.shape, **made["times"], **sizes(made["runtime"], made["merged"])}
    names = made["adapters"]
    result["latency"] = {
        "merged export": latency(made["merged"], "merged", names, args.runs, *args.shape),
        "runtime export, no adapter": latency(made["runtime"], "none", names, args.runs, *args.shape),
        "runtime export, adapter A": latency(made["runtime"], "one", names, args.runs, *args.shape),
        "runtime export, A and B alternating": latency(made["runtime"], "alternate", names, args.runs, *args.shape),
    }
    base_ms = result["latency"]["merged export"]["median_ms"]
    for row in result["latency"].values():
        row["vs_merged"] = round(row["median_ms"] / base_ms, 3)
    print(json.dumps(result, indent=2))
    (OUT / "runtime_adapters.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
