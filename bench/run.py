"""Time whole processes on a synthetic checkpoint: `cp -r` (the I/O floor), `ia3tools merge`,
`ia3tools merge --device cuda` (when a GPU is present), the PEFT path (when peft is installed),
and `inspect`/`check` latency. Wall time over several runs (median, min, max) and the peak RSS of
each process, via /usr/bin/time. Prints a table, writes JSON, draws a PNG when matplotlib is there.

    python bench/run.py --sizes 2 --runs 3            # makes bench/out/llama-2gb if missing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IA3 = [sys.executable, "-m", "ia3tools"]


def capped(cmd: list[str], limit_gb: float | None) -> list[str]:
    """``cmd`` confined to a memory cgroup (v1) of ``limit_gb``, so that running out of memory
    kills only it; unchanged when no limit is asked or no cgroup can be made."""
    if not limit_gb:
        return cmd
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":")[1] == "memory"), None)
    group = Path("/sys/fs/cgroup/memory") / (own or "/").lstrip("/") / "ia3tools-bench"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 2**30)))
    except OSError:
        print(f"warning: no memory cgroup at {group}; running uncapped", file=sys.stderr)
        return cmd
    return ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh", *cmd]


def measure(cmd: list[str], out: Path | None, runs: int) -> dict:
    """Run ``cmd`` ``runs`` times (removing ``out`` and syncing between runs, untimed)."""
    times, rss = [], []
    for _ in range(runs):
        if out is not None and out.exists():
            shutil.rmtree(out)
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
            result = {"failed": tail, "returncode": proc.returncode,
                      "after_s": round(time.perf_counter() - started, 1)}
            if out is not None and out.exists():
                shutil.rmtree(out)
            return result
        wall, kb = proc.stderr.strip().splitlines()[-1].split()
        times.append(float(wall))
        rss.append(int(kb) / 1024)
    if out is not None and out.exists():
        shutil.rmtree(out)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_rss_mb": max(rss), "runs": runs}


def bench_size(size_gb: float, runs: int, peft_runs: int, workdir: Path, peft_cap_gb: float | None = None,
               cleanup: bool = False) -> dict:
    pair = workdir / f"llama-{size_gb:g}gb"
    if not pair.exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), "--size-gb", str(size_gb),
                        "--dtype", "bf16", "--shard-size", "2GB", "-o", str(pair)], check=True)
    base, adapter, out = pair / "base", pair / "adapter", workdir / "merged"
    rows = {
        "cp -r": measure(["cp", "-r", str(base), str(out)], out, runs),
        # merge fsyncs before publishing; this is the copy with the same durability
        "cp -r && sync": measure(["sh", "-c", f'cp -r "{base}" "{out}" && sync'], out, runs),
        "ia3tools merge": measure([*IA3, "merge", str(base), str(adapter), "-o", str(out), "-q"], out, runs),
        "ia3tools merge --no-fsync": measure(
            [*IA3, "merge", str(base), str(adapter), "-o", str(out), "-q", "--no-fsync"], out, runs),
        "ia3tools inspect": measure([*IA3, "inspect", str(base), "--json"], None, runs),
        "ia3tools check": measure([*IA3, "check", str(base), str(adapter), "--json"], None, runs),
    }
    if _cuda():
        rows["ia3tools merge --device cuda"] = measure(
            [*IA3, "merge", str(base), str(adapter), "-o", str(out), "-q", "--device", "cuda"], out, runs)
    if importlib.util.find_spec("peft") and peft_runs:
        rows["PEFT merge_and_unload"] = measure(
            capped([sys.executable, str(HERE / "peft_merge.py"), str(base), str(adapter), str(out)], peft_cap_gb),
            out, peft_runs)
    size = sum(f.stat().st_size for f in base.iterdir())
    if cleanup:
        shutil.rmtree(pair)
    return {"size_gb": round(size / 1e9, 2), "results": rows, "peft_memory_cap_gb": peft_cap_gb}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def table(report: dict) -> str:
    lines = []
    for entry in report["sizes"]:
        r = entry["results"]
        cp, peft = r["cp -r"].get("median_s"), r.get("PEFT merge_and_unload", {}).get("median_s")
        lines.append(f"\n{entry['size_gb']} GB bf16 checkpoint")
        lines.append(f"{'command':<30}{'median s':>10}{'min s':>8}{'max s':>8}{'peak RSS MB':>13}{'x cp':>7}{'PEFT/x':>8}")
        for name, m in r.items():
            if "failed" in m:
                lines.append(f"{name:<30}  failed after {m['after_s']} s (exit {m['returncode']}): {m['failed'][-1]}")
                continue
            vs_cp = f"{m['median_s'] / cp:.2f}" if cp and ("merge" in name or "sync" in name) else ""
            vs_peft = f"{peft / m['median_s']:.1f}" if peft and name.startswith("ia3tools merge") else ""
            lines.append(f"{name:<30}{m['median_s']:>10.2f}{m['min_s']:>8.2f}{m['max_s']:>8.2f}"
                         f"{m['peak_rss_mb']:>13.0f}{vs_cp:>7}{vs_peft:>8}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in report["sizes"][0]["results"] if n not in ("ia3tools inspect", "ia3tools check")]
    for name in names:
        pts = [(e["size_gb"], e["results"][name]) for e in report["sizes"] if "median_s" in e["results"].get(name, {})]
        if pts:
            ax_t.plot([p[0] for p in pts], [p[1]["median_s"] for p in pts], "o-", label=name)
            ax_m.plot([p[0] for p in pts], [p[1]["peak_rss_mb"] for p in pts], "o-", label=name)
    ax_t.set(xlabel="checkpoint size (GB, bf16)", ylabel="wall time (s, median)", title="Merge time")
    ax_m.set(xlabel="checkpoint size (GB, bf16)", ylabel="peak RSS (MB)", title="Peak memory", yscale="log")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[2.0], help="checkpoint sizes in GB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peft-runs", type=int, default=1, help="0 skips the PEFT path")
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--peft-memory-cap-gb", type=float, default=None,
                    help="run the PEFT path in a memory cgroup of this size (for runs larger than RAM)")
    ap.add_argument("--cleanup", action="store_true", help="delete each synthetic checkpoint after measuring it")
    ap.add_argument("--append", action="store_true", help="add these sizes to an existing results.json")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = args.workdir / "results.json"
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)},
        "sizes": [],
    }
    if args.append and results.exists():
        report["sizes"] = json.loads(results.read_text())["sizes"]
    for size in args.sizes:
        entry = bench_size(size, args.runs, args.peft_runs, args.workdir, args.peft_memory_cap_gb, args.cleanup)
        report["sizes"] = [e for e in report["sizes"] if e["size_gb"] != entry["size_gb"]] + [entry]
        report["sizes"].sort(key=lambda e: e["size_gb"])
        results.write_text(json.dumps(report, indent=2))  # after every size: a long run keeps what it measured
    print(table(report))
    if plot(report, args.workdir / "results.png"):
        print(f"\nplot: {args.workdir / 'results.png'}")


if __name__ == "__main__":
    main()
