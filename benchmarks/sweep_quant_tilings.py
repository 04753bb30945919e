"""Tiling sweep of the quantized linear Triton kernel (oiv2compile/kernels/_quant_matmul.py) on a GPU:
for each weight shape, number of rows and format, the time of every tiling in a grid against the one
`choose_tiling` picks, bf16 F.linear and the copy bandwidth of the same run. It is how the tiling
rule was chosen; rerun it on a new card before changing the rule.

Timing as benchmarks/bench_kernels.py: weights cycled past L2, calls replayed from a CUDA graph,
median over replays. A `--budget-s` per (shape, M, format) bounds the run: the grid is walked in
order and cut off there (the default tiling is always measured first).

    python benchmarks/sweep_quant_tilings.py --shapes 4096x14336,14336x4096 --m 1,16 --out sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.bench_kernels import _graph_seconds
from oiv2compile.bench import copy_bandwidth_gbs, environment
from oiv2compile.kernels._quant_matmul import Tiling, choose_tiling, quant_matmul
from oiv2compile.kernels.linear_int4 import quantize as quantize_int4
from oiv2compile.kernels.linear_int8 import quantize as quantize_int8

ROTATE_BYTES = 400 << 20


def _grid(bits: int, group: int, k: int, m: int) -> list[Tiling]:
    """The tilings to try, in a fixed shuffled order so that a time budget samples the whole grid; at
    M = 1 the one-row (GEMV) kernel's tilings too."""
    # K steps are powers of two (the kernel's ranges); int4 steps hold whole groups.
    steps = tuple(bk for bk in (128, 256, 512, 1024) if bits == 8 or bk >= group)
    grid = [
        Tiling(16, bn, bk, sk, warps, stages)
        for bn, bk, sk, warps, stages in itertools.product((16, 32, 64), steps, (1, 2), (2, 4), (3, 4, 6))
        if k % (sk * bk) == 0
    ]
    if m == 1:
        grid += [
            Tiling(1, bn, bk, sk, warps, stages, gemv=True)
            for bn, bk, sk, warps, stages in itertools.product((16, 32, 64, 128), steps, (1, 2), (4, 8), (2, 3, 4))
            if k % (sk * bk) == 0
        ]
    random.Random(0).shuffle(grid)
    return grid


def _dense_seconds(x: torch.Tensor, copies: list[torch.Tensor]) -> float:
    return _graph_seconds(lambda i: F.linear(x, copies[i % len(copies)]), max(16, len(copies)), 30)


def _time_tilings(
    x: torch.Tensor,
    weights: list[tuple[Any, ...]],
    bits: int,
    group: int,
    tilings: list[Tiling],
    nbytes: int,
    bandwidth: float,
    budget_s: float,
) -> list[dict[str, Any]]:
    """Each tiling's time and bandwidth, in order, until the budget is spent."""
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for tiling in tilings:
        if time.perf_counter() - start > budget_s:
            break
        try:
            seconds = _graph_seconds(
                lambda i, t=tiling: quant_matmul(x, *weights[i % len(weights)], bits, group, t),
                max(16, len(weights)),
                20,
            )
        except Exception as exc:  # a tiling that does not fit (shared memory, registers)
            results.append({"tiling": vars(tiling), "error": str(exc).splitlines()[0][:160]})
            continue
        gbs = nbytes / seconds / 1e9
        results.append({"tiling": vars(tiling), "us": seconds * 1e6, "gbs": gbs, "share_of_copy": gbs / bandwidth})
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096,1024x4096", help="NxK, comma-separated")
    p.add_argument("--m", default="1,16", help="rows of x")
    p.add_argument("--formats", default="int8,int4-g128", help="int8, int4-g32, int4-g64, int4-g128")
    p.add_argument("--budget-s", type=float, default=30.0, help="seconds per (shape, M, format)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda")
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth_gbs(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device=device) * 0.02
        dense = w.to(dtype)
        dense_copies = [
            dense,
            *(dense.clone() for _ in range(max(0, min(32, math.ceil(ROTATE_BYTES / dense.nbytes)) - 1))),
        ]
        for fmt in args.formats.split(","):
            bits = 8 if fmt == "int8" else 4
            group = 0 if bits == 8 else int(fmt.split("-g")[1])
            if bits == 8:
                q, s = quantize_int8(w, dtype)
                weights, zeros = [(q, s, None)], None
            else:
                q, s, zeros = quantize_int4(w, group, dtype)
                weights = [(q, s, zeros)]
            nbytes = sum(t.nbytes for t in weights[0] if t is not None)
            copies = max(1, min(32, math.ceil(ROTATE_BYTES / nbytes)))
            weights += [(q.clone(), s, zeros) for _ in range(copies - 1)]
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k, device=device, dtype=dtype)
                bf16_s = _dense_seconds(x, dense_copies)
                chosen = choose_tiling(m, n, k, bits, group, sms)
                tilings = [chosen, *(t for t in _grid(bits, group, k, m) if t != chosen)]
                results = _time_tilings(x, weights, bits, group, tilings, nbytes, bandwidth, args.budget_s)
                timed = [r for r in results if "us" in r]
                best = min(timed, key=lambda r: r["us"])
                row = {
                    "n": n,
                    "k": k,
                    "m": m,
                    "format": fmt,
                    "bf16_us": bf16_s * 1e6,
                    "bf16_share_of_copy": dense.nbytes / bf16_s / 1e9 / bandwidth,
                    "chosen": timed[0] if results and "us" in results[0] else results[0],
                    "best": best,
                    "tried": len(results),
                    "all": results,
                }
                rows.append(row)
                print(
                    f"{n}x{k} M={m} {fmt}: bf16 {row['bf16_us']:.1f} us ({row['bf16_share_of_copy']:.0%}) | "
                    f"chosen {row['chosen'].get('us', float('nan')):.1f} us ({row['chosen'].get('share_of_copy', 0):.0%}) | "
                    f"best of {len(results)} {best['us']:.1f} us ({best['share_of_copy']:.0%}) {best['tiling']}",
                    flush=True,
                )
                if args.out:
                    report = {"environment": environment(device), "copy_bandwidth_gbs": bandwidth, "rows": rows}
                    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        del w, dense, dense_copies
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bandwidth:.0f} GB/s on {torch.cuda.get_device_name(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
