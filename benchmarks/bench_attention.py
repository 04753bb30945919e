"""Decode attention (oiv2::attention at one new token per sequence) on a GPU: flash-decoding, the
split path the op takes, against the single-pass kernel it replaced, by filled length.

For each batch B, cache length T and filled length (positions + 1, the same for every sequence):
the time of one call, the bytes of K and V it must read (2 * B * Hkv * filled * D * 2 in bf16)
over that time, and the copy bandwidth measured in the same run. Candidates, all in the same run:
  split (planned)   torch.ops.oiv2.attention, as an artifact calls it (decode_splits plans the grid)
  single pass       the kernel with one program per (sequence, kv head): splits=1
  split, chunk C    the split path with C positions per program, for each C of --chunks
Timing as benchmarks/bench_kernels.py: calls replayed from one CUDA graph (no host launch cost),
CUDA events, median over replays; each call of the graph reads other cache rows, so that the rows
read between two reads of the same row exceed the L2 cache. The issue's check, printed at the end:
the planned split path at filled 4000 in a cache of 8192 within 15% of filled 4000 in one of 4096.

    PYTHONPATH=. python benchmarks/bench_attention.py --out benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_kernels import _graph_seconds
from oiv2compile.bench import copy_bandwidth_gbs, environment

# The module, not the op of the same name that oiv2compile.kernels exports.
attention_mod = importlib.import_module("oiv2compile.kernels.attention")

ROTATE_BYTES = 256 << 20  # K/V bytes read by the calls of one graph before a row comes again
CHECK = (4000, 4096, 8192, 1.15)  # filled, smaller cache, larger cache, largest allowed time ratio


def candidates(cache_len: int, chunks: list[int]) -> dict[str, Callable[..., torch.Tensor]]:
    """Name: call(q, k_cache, v_cache, slots, positions, scale)."""
    found: dict[str, Callable[..., torch.Tensor]] = {
        "split (planned)": torch.ops.oiv2.attention,
        "single pass": lambda *args: attention_mod._attention_triton(*args, splits=1),
    }
    for chunk in chunks:
        splits = math.ceil(cache_len / chunk)
        found[f"split, chunk {chunk}"] = lambda *args, splits=splits: attention_mod._attention_triton(
            *args, splits=splits
        )
    return found


def time_case(
    call: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: int,
    filled: int,
    repeats: int,
) -> float:
    """Median seconds of one call; call i reads the rows of slot group i, cycled over the cache."""
    rows = k_cache.shape[0]
    read = 2 * batch * k_cache.shape[1] * filled * k_cache.shape[3] * k_cache.element_size()
    groups = max(16, min(rows // batch, math.ceil(ROTATE_BYTES / read)))
    slots = [(torch.arange(batch, device=q.device) + i * batch) % rows for i in range(groups)]  # [B] each
    positions = torch.full((batch,), filled - 1, dtype=torch.long, device=q.device)
    scale = 1 / math.sqrt(q.shape[-1])
    return _graph_seconds(lambda i: call(q, k_cache, v_cache, slots[i % groups], positions, scale), groups, repeats)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cache-lens", default="4096,8192")
    p.add_argument("--filled", default="128,1000,4000,8000", help="filled lengths; those above T are left out")
    p.add_argument("--chunks", default="", help="extra split candidates: positions per program, e.g. 64,256")
    p.add_argument("--cache-gib", type=float, default=16.0, help="memory for the K and V cache rows cycled over")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py times the Triton kernels and needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = torch.bfloat16
    chunks = [int(c) for c in args.chunks.split(",") if c]
    bandwidth = copy_bandwidth_gbs(device)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    rows: list[dict[str, Any]] = []
    for cache_len in (int(t) for t in args.cache_lens.split(",")):
        row_bytes = 2 * args.kv_heads * cache_len * args.head_dim * 2  # K and V of one cache row
        cache_rows = max(1, int(args.cache_gib * (1 << 30) // row_bytes))
        shape = (cache_rows, args.kv_heads, cache_len, args.head_dim)
        k_cache = torch.randn(shape, device=device, dtype=dtype)
        v_cache = torch.randn(shape, device=device, dtype=dtype)
        for batch in (int(b) for b in args.batch.split(",")):
            q = torch.randn(batch, 1, args.heads, args.head_dim, device=device, dtype=dtype).transpose(1, 2)
            splits = attention_mod.decode_splits(1, batch, args.kv_heads, cache_len, sm_count)
            for filled in (int(f) for f in args.filled.split(",")):
                if filled > cache_len:
                    continue
                nbytes = 2 * batch * args.kv_heads * filled * args.head_dim * 2
                for name, call in candidates(cache_len, chunks).items():
                    seconds = time_case(call, q, k_cache, v_cache, batch, filled, args.repeats)
                    gbs = nbytes / seconds / 1e9
                    row = dict(
                        batch=batch,
                        cache_len=cache_len,
                        filled=filled,
                        candidate=name,
                        planned_splits=splits,
                        us=seconds * 1e6,
                        kv_bytes=nbytes,
                        gbs=gbs,
                        share_of_copy=gbs / bandwidth,
                    )
                    rows.append(row)
                    print(_line(row), file=sys.stderr, flush=True)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    checks = _checks(rows)
    report = {
        "environment": environment(device),
        "copy_bandwidth_gbs": bandwidth,
        "sm_count": sm_count,
        "decode_chunk": attention_mod.DECODE_CHUNK,
        "args": vars(args),
        "rows": rows,
        "checks": checks,
    }
    print(_table(rows, bandwidth, report["environment"]["device"]))
    for check in checks:
        verdict = "within" if check["ratio"] <= CHECK[3] else "NOT within"
        print(
            f"check B={check['batch']}: filled {CHECK[0]} in T={CHECK[2]} takes {check['ratio']:.2f}x "
            f"the time in T={CHECK[1]} ({verdict} {CHECK[3]:.2f}x)"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each batch measured at both cache lengths of CHECK: the planned split path's time ratio."""
    filled, small, large, _limit = CHECK
    us = {
        (r["batch"], r["cache_len"]): r["us"]
        for r in rows
        if r["candidate"] == "split (planned)" and r["filled"] == filled
    }
    batches = sorted({b for b, _t in us if (b, small) in us and (b, large) in us})
    return [
        {"batch": b, "us_small": us[(b, small)], "us_large": us[(b, large)], "ratio": us[(b, large)] / us[(b, small)]}
        for b in batches
    ]


def _line(row: dict[str, Any]) -> str:
    head = f"B={row['batch']:<2} T={row['cache_len']:<5} filled={row['filled']:<5} {row['candidate']:<18}"
    return f"{head} {row['us']:>8.1f} us {row['gbs']:>7.0f} GB/s ({row['share_of_copy']:.0%} of copy)"


def _table(rows: list[dict[str, Any]], bandwidth: float, device: str) -> str:
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    cases = list(dict.fromkeys((r["batch"], r["cache_len"], r["filled"], r["planned_splits"]) for r in rows))
    by = {(r["batch"], r["cache_len"], r["filled"], r["candidate"]): r for r in rows}
    lines = [
        f"Decode attention, bf16, {device}, copy bandwidth {bandwidth:.0f} GB/s: us per call, K/V GB/s (share of copy)",
        "",
        "| B | T | filled | planned splits | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for batch, cache_len, filled, splits in cases:
        cells = []
        for name in names:
            r = by[(batch, cache_len, filled, name)]
            cells.append(f"{r['us']:.1f} us, {r['gbs']:.0f} GB/s ({r['share_of_copy']:.0%})")
        lines.append(f"| {batch} | {cache_len} | {filled} | {splits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
