"""Fold throughput per core: `NumpyFolder.fold` (widen, multiply in float32, cast back with
ml_dtypes' round-to-nearest-even) on one 16 MB block (merge's block size) of random weights, per
dtype and orientation (rows: a `(n, 1)` vector; columns: `(1, n)`), single-threaded (MB/s of the
source weights, best of ``--repeats``), then with 1..``--threads`` threads folding blocks
concurrently (aggregate MB/s), as merge's write workers do. For bf16, beside it, the bit-level
candidate of issue 17 (shift to widen, multiply, round on the integer view), checked bit-identical
first.

    python bench/fold_speed.py --repeats 7 --threads 2      # writes bench/out/fold_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ia3tools.fold import BLOCK_BYTES, CACHE_BYTES, NumpyFolder, block_scale, row_blocks
from ia3tools.formats.dtypes import DTYPES

OUT = Path(__file__).resolve().parent / "out"
DTYPE_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def bit_level_fold(raw: bytes, dtype: str, shape, scale: np.ndarray) -> np.ndarray:
    """The bf16 fold on the bits, in cache pieces into reused buffers: widen by shifting 16 bits
    left, multiply, add 0x7FFF plus the lowest kept bit, keep the high 16 bits."""
    x = np.frombuffer(raw, np.uint16).reshape(shape)
    y = np.empty(x.shape, np.uint16)
    first = next(row_blocks(x.shape, 4, CACHE_BYTES))
    size = first[1] * int(np.prod(shape[1:]))
    wide, low = np.empty(size, np.uint32), np.empty(size, np.uint32)
    for lo, n in row_blocks(x.shape, 4, CACHE_BYTES):
        piece, out = x[lo:lo + n], y[lo:lo + n]
        w, t = wide[:piece.size].reshape(piece.shape), low[:piece.size].reshape(piece.shape)
        np.left_shift(piece, 16, out=w, dtype=np.uint32)
        f = w.view(np.float32)
        np.multiply(f, block_scale(scale, lo, n), out=f)
        np.right_shift(w, 16, out=t)
        np.bitwise_and(t, 1, out=t)
        np.add(t, 0x7FFF, out=t)
        np.add(w, t, out=w)
        np.right_shift(w, 16, out=out, casting="unsafe")
    return y


def block(dtype: str, orientation: str):
    itemsize = DTYPES[dtype].bits // 8
    cols = 2048
    rows = BLOCK_BYTES // itemsize // cols
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((rows, cols)).astype(np.float32) * 0.05).astype(DTYPES[dtype].numpy)
    shape = (rows, 1) if orientation == "rows" else (1, cols)
    return w.tobytes(), w.shape, (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)


def best_mb_s(fn, nbytes: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(nbytes / best / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    from ia3tools.allocator import tune

    tune()  # as the command line runs
    folder, rows = NumpyFolder(), []
    for name, dtype in DTYPE_NAMES.items():
        for orientation in ("rows", "columns"):
            raw, shape, scale = block(dtype, orientation)
            row = {"dtype": name, "orientation": orientation,
                   "fold_mb_s": best_mb_s(lambda: folder.fold(raw, dtype, shape, scale), len(raw), args.repeats)}
            if dtype == "BF16":
                assert np.array_equal(np.frombuffer(folder.fold(raw, dtype, shape, scale), np.uint16).reshape(shape),
                                      bit_level_fold(raw, dtype, shape, scale))
                row["bit_level_mb_s"] = best_mb_s(lambda: bit_level_fold(raw, dtype, shape, scale), len(raw),
                                                  args.repeats)
            for threads in range(1, args.threads + 1):
                with ThreadPoolExecutor(threads) as pool:
                    def many():
                        list(pool.map(lambda _: folder.fold(raw, dtype, shape, scale), range(4 * threads)))
                    row[f"threads_{threads}_mb_s"] = best_mb_s(many, 4 * threads * len(raw), max(3, args.repeats // 2))
            rows.append(row)
            print(json.dumps(row))
    OUT.mkdir(exist_ok=True)
    (OUT / "fold_speed.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
