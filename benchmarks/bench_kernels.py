"""Quantized linear kernels against what PyTorch ships, on the linear shapes of real models.

For each (output features N, input features K) of the chosen models' linears (q, k, v, o, gate, up,
down, and the output head) and each number of rows M: the time of y = x @ W^T and the bandwidth over
the bytes it must read (weights, scales and zero points, activations), against the copy bandwidth
measured in the same run. Candidates, all in the same run:
  bf16 F.linear · oiv2::linear_int8 · oiv2::linear_int4 (group 128) · aten._weight_int8pack_mm ·
  Inductor's fused dequantize-then-linear (torch.compile of the int8 reference) ·
  aten._weight_int4pack_mm (tinygemm, group 128)
  oiv2::linear_int8_gemv (the CUDA C++ GEMV, M <= 4) · oiv2::linear_int8_gemm (the CUDA C++ op of int8
  prefill: on Hopper the wgmma GEMM to 256 rows, dequantize-then-cuBLAS above) · oiv2::linear_int4_mma
  (group 128, the CUDA C++ op the builds use for int4: tensor cores up to 32 rows, on Hopper the wgmma
  GEMM to 256, dequantize-then-cuBLAS above) ·
  dequantize into bf16, then F.linear (the prefill alternative to a mixed-input GEMM)
  The three int8 oiv2 ops again with "tiles": the weights in int8-tiles16x1024-v2, as CUDA builds store them.
The oiv2 ops are called as an artifact's code calls them (on CPU: their PyTorch reference). A
candidate that cannot run here is a row `unavailable: <why>`. Weights rotate over enough copies that
the last-level cache never holds them (as ANCHORS.md measured). On CUDA the calls are replayed from a
CUDA graph, as a decode step runs them, so no host launch time is counted; CUDA events, median over
replays after warm-up.

    python benchmarks/bench_kernels.py --models llama-1b,llama-8b,llama2-7b --out benchmarks/results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from oiv2compile.bench import copy_bandwidth_gbs, environment
from oiv2compile.kernels import linear_int4_mma, linear_int8_gemm, linear_int8_gemv
from oiv2compile.kernels.linear_int4 import dequantize as dequantize_int4
from oiv2compile.kernels.linear_int4 import quantize as quantize_int4
from oiv2compile.kernels.linear_int4 import unpack as unpack_int4
from oiv2compile.kernels.linear_int8 import dequantize as dequantize_int8
from oiv2compile.kernels.linear_int8 import quantize as quantize_int8
from oiv2compile.kernels.linear_int8 import tile, tiles_fit
from oiv2compile.models import PRESETS

ROTATE_BYTES = 512 << 20  # weights cycled per candidate: far beyond any L2 / last-level cache
GROUP = 128


def linear_shapes(models: list[str]) -> list[tuple[int, int, str]]:
    """(N, K, where from) of every distinct linear of the models, the output head included."""
    shapes: dict[tuple[int, int], str] = {}
    for model in models:
        c = PRESETS[model]
        hidden, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        head_dim = c.get("head_dim") or hidden // heads
        for name, n, k in (
            ("q", heads * head_dim, hidden),
            ("k/v", kv * head_dim, hidden),
            ("o", hidden, heads * head_dim),
            ("gate/up", c["intermediate_size"], hidden),
            ("down", hidden, c["intermediate_size"]),
            ("head", c["vocab_size"], hidden),
        ):
            shapes.setdefault((n, k), f"{model} {name}")
    return [(n, k, where) for (n, k), where in shapes.items()]


def candidates(n: int, k: int, device: torch.device) -> dict[str, Callable[[], tuple[list[Any], int, Callable]]]:
    """Each candidate: a maker of (one weight set, the bytes it reads per call, the call(x, *weights))."""
    dtype = torch.bfloat16

    def bf16() -> tuple[list[Any], int, Callable]:
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        return [w], w.nbytes, lambda x, w: F.linear(x, w)

    def int8_ours() -> tuple[list[Any], int, Callable]:
        q, s = quantize_int8(torch.randn(n, k, device=device) * 0.02, dtype)
        return [q, s], q.nbytes + s.nbytes, lambda x, q, s: torch.ops.oiv2.linear_int8(x, q, s)

    def int4_ours() -> tuple[list[Any], int, Callable]:
        _check_groups(k)
        p, s, z = quantize_int4(torch.randn(n, k, device=device) * 0.02, GROUP, dtype)
        return [p, s, z], p.nbytes + s.nbytes + z.nbytes, lambda x, p, s, z: torch.ops.oiv2.linear_int4(x, p, s, z)

    def int8_gemv() -> tuple[list[Any], int, Callable]:
        q, s = quantize_int8(torch.randn(n, k, device=device) * 0.02, dtype)
        return [q, s], q.nbytes + s.nbytes, lambda x, q, s: _gemv(torch.ops.oiv2.linear_int8_gemv, x, q, s)

    def int8_tiles() -> tuple[torch.Tensor, torch.Tensor]:
        """int8 weights in int8-tiles16x1024-v2, as CUDA builds store them (passes/tile_int8_weights.py)."""
        if not tiles_fit(n, k):
            raise RuntimeError(f"{n} x {k} does not fit the int8 tiles")
        q, s = quantize_int8(torch.randn(n, k, device=device) * 0.02, dtype)
        return tile(q), s

    def int8_ours_tiles() -> tuple[list[Any], int, Callable]:
        q, s = int8_tiles()
        return [q, s], q.nbytes + s.nbytes, lambda x, q, s: torch.ops.oiv2.linear_int8(x, q, s)

    def int8_gemv_tiles() -> tuple[list[Any], int, Callable]:
        q, s = int8_tiles()
        return [q, s], q.nbytes + s.nbytes, lambda x, q, s: _gemv(torch.ops.oiv2.linear_int8_gemv, x, q, s)

    def int8_gemm_tiles() -> tuple[list[Any], int, Callable]:
        q, s = int8_tiles()
        return [q, s], q.nbytes + s.nbytes, torch.ops.oiv2.linear_int8_gemm

    def int8_gemm() -> tuple[list[Any], int, Callable]:
        q, s = quantize_int8(torch.randn(n, k, device=device) * 0.02, dtype)
        return [q, s], q.nbytes + s.nbytes, torch.ops.oiv2.linear_int8_gemm

    def int4_mma() -> tuple[list[Any], int, Callable]:
        _check_groups(k)
        p, s, z = quantize_int4(torch.randn(n, k, device=device) * 0.02, GROUP, dtype)
        packed, pairs = linear_int4_mma.pack(unpack_int4(p, GROUP)), linear_int4_mma.scale_zero(s, z)
        return [packed, pairs], packed.nbytes + pairs.nbytes, torch.ops.oiv2.linear_int4_mma

    def int8_dequant_linear() -> tuple[list[Any], int, Callable]:
        q, s = quantize_int8(torch.randn(n, k, device=device) * 0.02, dtype)
        return [q, s], q.nbytes + s.nbytes, lambda x, q, s: F.linear(x, dequantize_int8(q, s))

    def int4_dequant_linear() -> tuple[list[Any], int, Callable]:
        _check_groups(k)
        p, s, z = quantize_int4(torch.randn(n, k, device=device) * 0.02, GROUP, dtype)
        return [p, s, z], p.nbytes + s.nbytes + z.nbytes, lambda x, p, s, z: F.linear(x, dequantize_int4(p, s, z))

    def int8pack() -> tuple[list[Any], int, Callable]:
        q, s = quantize_int8(torch.randn(n, k, device=device) * 0.02, dtype)
        return [q, s], q.nbytes + s.nbytes, lambda x, q, s: torch.ops.aten._weight_int8pack_mm(x, q, s)

    fused = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s, dynamic=False)

    def int8_inductor() -> tuple[list[Any], int, Callable]:
        q, s = quantize_int8(torch.randn(n, k, device=device) * 0.02, dtype)
        return [q, s], q.nbytes + s.nbytes, fused

    def int4pack() -> tuple[list[Any], int, Callable]:
        _check_groups(k)
        p, s, z = quantize_int4(torch.randn(n, k, device=device) * 0.02, GROUP, dtype)
        q = unpack_int4(p, GROUP).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        # tinygemm's zero point is in float units around the middle level: w = (q - 8) * s + zero.
        zero = (8 - z.float()) * s.float()
        scales_and_zeros = torch.stack([s.float(), zero], dim=2).transpose(0, 1).contiguous().to(dtype)
        nbytes = packed.nbytes + scales_and_zeros.nbytes
        return [packed, scales_and_zeros], nbytes, lambda x, w, sz: torch.ops.aten._weight_int4pack_mm(x, w, GROUP, sz)

    return {
        "bf16 F.linear": bf16,
        "oiv2::linear_int8": int8_ours,
        "oiv2::linear_int4 g128": int4_ours,
        "oiv2::linear_int8_gemv (CUDA C++)": int8_gemv,
        "oiv2::linear_int8 tiles": int8_ours_tiles,
        "oiv2::linear_int8_gemv tiles (CUDA C++)": int8_gemv_tiles,
        "oiv2::linear_int8_gemm tiles (CUDA C++)": int8_gemm_tiles,
        "oiv2::linear_int8_gemm (CUDA C++)": int8_gemm,
        "oiv2::linear_int4_mma g128 (CUDA C++)": int4_mma,
        "int8 dequantize, then F.linear": int8_dequant_linear,
        "int4 g128 dequantize, then F.linear": int4_dequant_linear,
        "aten._weight_int8pack_mm": int8pack,
        "Inductor dequantize+linear (int8)": int8_inductor,
        "aten._weight_int4pack_mm g128": int4pack,
    }


def _gemv(op: Any, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > linear_int8_gemv.MAX_ROWS:
        raise RuntimeError(f"the CUDA C++ kernels take at most {linear_int8_gemv.MAX_ROWS} rows")
    return op(x, *weights)


def _check_groups(k: int) -> None:
    if k % GROUP:
        raise RuntimeError(f"{k} input features are not a multiple of the group size {GROUP}")


def time_candidate(make: Callable, m: int, k: int, device: torch.device, repeats: int) -> tuple[float, int]:
    """Median seconds of one call, over weight sets cycled past the cache; and the bytes one call reads."""
    first, nbytes, call = make()
    extra = min(63, max(0, math.ceil(ROTATE_BYTES / max(nbytes, 1)) - 1))
    copies = [first, *(make()[0] for _ in range(extra))]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    for weights in copies[:3]:
        call(x, *weights)
    if device.type == "cuda":
        return _graph_seconds(
            lambda i: call(x, *copies[i % len(copies)]), max(len(copies), 16), repeats
        ), nbytes + x.nbytes
    times = []
    for i in range(repeats):
        weights = copies[i % len(copies)]
        begin = time.perf_counter()
        call(x, *weights)
        times.append(time.perf_counter() - begin)
    return statistics.median(times), nbytes + x.nbytes


def _graph_seconds(call: Callable[[int], Any], calls: int, repeats: int) -> float:
    """Median seconds per call of `calls` calls replayed from one CUDA graph: what a decode step's
    graph pays, with no host launch cost between kernels."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
        call(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    graph.replay()
    times = []
    for _ in range(max(3, repeats // 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-1b,llama-8b,llama2-7b")
    p.add_argument("--m", default="1,2,4,8,16,32,512", help="rows of x; the last is the prefill size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--candidates", help="comma-separated substrings: only candidates whose name has one")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        linear_int8_gemv.load_extension()  # the CUDA C++ kernels: nvcc once each, cached after
        linear_int4_mma.load_extension()
        linear_int8_gemm.load_extension()
    bandwidth = copy_bandwidth_gbs(device)
    rows = []
    for n, k, where in linear_shapes(args.models.split(",")):
        torch.compiler.reset()  # one Inductor compile per shape, never the recompile limit
        makers = candidates(n, k, device)
        if args.candidates:
            wanted = args.candidates.split(",")
            makers = {name: make for name, make in makers.items() if any(w in name for w in wanted)}
        for m in (int(v) for v in args.m.split(",")):
            for name, make in makers.items():
                row: dict[str, Any] = {"n": n, "k": k, "m": m, "shape": where, "candidate": name}
                try:
                    seconds, nbytes = time_candidate(make, m, k, device, args.repeats)
                except (RuntimeError, NotImplementedError) as exc:  # an op this build or device lacks
                    row["unavailable"] = str(exc).strip().splitlines()[0][:160]
                else:
                    gbs = nbytes / seconds / 1e9
                    row.update(us=seconds * 1e6, bytes=nbytes, gbs=gbs, share_of_copy=gbs / bandwidth)
                rows.append(row)
                print(_line(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = {"environment": environment(device), "copy_bandwidth_gbs": bandwidth, "args": vars(args), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"copy bandwidth {bandwidth:.0f} GB/s on {report['environment']['device']}")
    return 0


def _line(row: dict[str, Any]) -> str:
    head = f"{row['shape']:<18} {row['n']:>6}x{row['k']:<6} M={row['m']:<4} {row['candidate']:<36}"
    if "unavailable" in row:
        return f"{head} unavailable: {row['unavailable']}"
    return f"{head} {row['us']:>9.1f} us {row['gbs']:>8.1f} GB/s ({row['share_of_copy']:.0%} of copy)"


if __name__ == "__main__":
    sys.exit(main())
