"""A decode step's linears and the small kernels between them, as a CUDA graph; attention optional.

Per layer, in the order a batch-1 decode step of a Llama-shaped model runs them:
    add_rms_norm -> qkv -> o -> add_rms_norm -> gate_up -> gated_act -> down
with every layer's weights its own (32 layers of llama-8b hold 7 GB of int8 weights, far beyond L2).
The linears are the ops a CUDA artifact calls: bf16 F.linear (cuBLAS), oiv2::linear_int8_gemv, or
oiv2::linear_int4_mma (group 128). What this isolates from `oiv2compile bench`: the linears' streaming
and the launch gaps and overlap between them and the Triton kernels around them (programmatic dependent
launch), without a build. Step time is the median over replays; bandwidth counts the linears' weight
bytes (and int4 scales and zeros) over the step time, against the copy bandwidth of the same run.
--attention puts a decode attention between each qkv and o product (its own cache of --cache-len
positions a layer, --filled of them filled): the Triton oiv2::rope_kv_write_attention or the C++
oiv2::prefetched_decode_attention; by default (none) a copy of the qkv row's q stands in for it.

To compare two versions of a kernel, run this once per source tree (each compiles its own library).

    python benchmarks/bench_linear_chain.py --model llama-8b --quant bf16,int8,int4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from oiv2compile.bench import copy_bandwidth_gbs
from oiv2compile.kernels import (  # noqa: F401 (ops)
    add_rms_norm,
    gated_act,
    linear_int4_mma,
    linear_int8_gemv,
    prefetched_decode_attention,
)
from oiv2compile.kernels.gated_act import ACTIVATIONS
from oiv2compile.kernels.linear_int8 import tile
from oiv2compile.models import PRESETS

GROUP = 128
SILU = ACTIVATIONS.index("silu")  # the gated kernel takes the activation by index
# int8-norm / int4-norm: each residual add and RMSNorm inside the products around it
# (fuse_norm_into_gemv); int8-norm-act / int4-norm-act: that, and the gated activation in the gate/up
# product (fuse_gated_act_into_gemv; random levels, so the int4 rows' interleave changes nothing here).
# An int8 name with "+tiles" (int8+tiles, int8-norm-act+tiles, ...) reads its weights in int8-tiles16x1024-v2,
# gate/up in the paired form (tile_int8_weights, as CUDA artifacts do); without, row-major.
QUANTS = ("bf16", "int8", "int8-norm", "int8-norm-act", "int4", "int4-norm", "int4-norm-act")


GATE_UP = 2  # linear_shapes' gate/up: its int8 tiles are paired, as tile_int8_weights pairs them


def linear_shapes(model: str) -> list[tuple[int, int]]:
    """(N, K) of one layer's qkv, o, gate_up and down, as the fuse passes make them."""
    c = PRESETS[model]
    hidden, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    inter = c["intermediate_size"]
    return [((heads + 2 * kv) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden), (hidden, inter)]


def make_linear(
    quant: str, n: int, k: int, device: torch.device, tiles: bool = False, paired: bool = False
) -> tuple[Callable, int]:
    """A call y = x @ W^T with random weights in the op's layout, and the bytes it reads for W."""
    if quant == "bf16":
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        return (lambda x: F.linear(x, w)), w.numel() * 2
    if quant == "int8":
        q, s = int8_weight(n, k, device, tiles, paired)
        return (lambda x: torch.ops.oiv2.linear_int8_gemv(x, q, s)), q.numel() + s.numel() * 2
    packed, pairs = int4_weight(n, k, device)
    return (lambda x: torch.ops.oiv2.linear_int4_mma(x, packed, pairs)), packed.numel() + pairs.numel() * 2


def int8_weight(
    n: int, k: int, device: torch.device, tiles: bool = False, paired: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 rows and their scales in int8-rowmajor-v1 (tiles: int8-tiles16x1024-v2, paired or not):
    (qweight, scales)."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    return tile(q, paired) if tiles else q, torch.rand(n, device=device, dtype=torch.bfloat16) * 1e-3


def int4_weight(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random levels and group scales in int4-mma16x64-v1: (packed, scale_zero)."""
    levels = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = torch.rand(n, k // GROUP, device=device, dtype=torch.bfloat16) * 1e-3
    zeros = torch.full((n, k // GROUP), 8.0, device=device, dtype=torch.bfloat16)
    return linear_int4_mma.pack(levels), linear_int4_mma.scale_zero(scales, zeros)


ATTENTIONS = ("none", "triton", "prefetched")


def make_attentions(
    kind: str, model: str, layers: int, device: torch.device, cache_len: int = 256, filled: int = 192
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Per layer, the qkv row [1, (Hq + 2 Hkv) D] -> the attention's output [1, Hq D]: a decode attention
    over a cache of its own (kind "triton" or "prefetched"), or (kind "none") the row's q copied."""
    c = PRESETS[model]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if kind == "none":
        return [lambda y: y[:, : heads * head_dim].contiguous()] * layers
    op = {"triton": torch.ops.oiv2.rope_kv_write_attention, "prefetched": torch.ops.oiv2.prefetched_decode_attention}
    angles = torch.rand(cache_len, head_dim // 2, device=device) * 3
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    slots, positions = torch.zeros(1, dtype=torch.long, device=device), torch.tensor([filled], device=device)
    scale = head_dim**-0.5

    def attention_of(k_cache: torch.Tensor, v_cache: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(y: torch.Tensor) -> torch.Tensor:
            args = (y.view(1, 1, -1), cos, sin, None, k_cache, v_cache, slots, positions, heads, kv, scale)
            return op[kind](*args).view(1, -1)

        return call

    shape = (1, kv, cache_len, head_dim)
    return [
        attention_of(*(torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(2)))
        for _ in range(layers)
    ]


def make_step(
    quant: str,
    model: str,
    layers: int,
    device: torch.device,
    attention: str = "none",
    cache_len: int = 256,
    filled: int = 192,
) -> tuple[Callable, int]:
    """One decode step of `layers` layers (batch 1) and the weight bytes it reads."""
    shapes = linear_shapes(model)
    hidden = shapes[0][1]
    attentions = make_attentions(attention, model, layers, device, cache_len, filled)
    quant, tiles = quant.removesuffix("+tiles"), quant.endswith("+tiles")
    if quant.startswith(("int8-norm", "int4-norm")):
        return _fused_norm_step(quant[:4], layers, device, shapes, attentions, quant.endswith("-act"), tiles)
    stack = [
        [make_linear(quant, n, k, device, tiles, i == GATE_UP) for i, (n, k) in enumerate(shapes)]
        for _ in range(layers)
    ]
    norm = torch.ones(hidden, device=device, dtype=torch.bfloat16)

    def step(x: torch.Tensor) -> torch.Tensor:
        residual = x
        for ((qkv, _), (o, _), (gate_up, _), (down, _)), attend in zip(stack, attentions, strict=True):
            h, residual = torch.ops.oiv2.add_rms_norm(x, residual, norm, 1e-5)
            x = o(attend(qkv(h)))
            h, residual = torch.ops.oiv2.add_rms_norm(x, residual, norm, 1e-5)
            x = down(torch.ops.oiv2.gated_act(gate_up(h), "silu"))
        return x

    return step, sum(b for layer in stack for _, b in layer)


def _fused_norm_step(  # type: ignore[no-untyped-def]
    bits: str,
    layers: int,
    device: torch.device,
    shapes: list[tuple[int, int]],
    attentions: list[Callable[[torch.Tensor], torch.Tensor]],
    gated_in_gemv: bool,
    tiles: bool = False,
):
    """The int8 or int4 step with each residual add in the o and down products and each RMSNorm in the
    qkv and gate/up products after them (oiv2::linear_int8_gemv_add, oiv2::rms_norm_linear_int8_gemv;
    oiv2::linear_int4_mma_add, oiv2::rms_norm_linear_int4_mma), and with gated_in_gemv the activation
    in the gate/up product too (oiv2::rms_norm_linear_int8_gemv_gated_act,
    oiv2::rms_norm_linear_int4_mma_gated_act)."""
    ops = torch.ops.oiv2
    if bits == "int8":
        weights = [
            int8_weight(n, k, device, tiles, i == GATE_UP) for _ in range(layers) for i, (n, k) in enumerate(shapes)
        ]
    else:
        weights = [int4_weight(n, k, device) for _ in range(layers) for n, k in shapes]
    if bits == "int8":
        product_add, norm_product = ops.linear_int8_gemv_add, ops.rms_norm_linear_int8_gemv
        norm_product_act = ops.rms_norm_linear_int8_gemv_gated_act
    else:
        product_add, norm_product = ops.linear_int4_mma_add, ops.rms_norm_linear_int4_mma
        norm_product_act = ops.rms_norm_linear_int4_mma_gated_act
    stack = [weights[4 * i : 4 * i + 4] for i in range(layers)]

    def mlp_input(h: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if gated_in_gemv:
            return norm_product_act(h, q, s, 1e-5, SILU)
        return ops.gated_act(norm_product(h, q, s, 1e-5), "silu")

    def step(x: torch.Tensor) -> torch.Tensor:
        h = x  # the residual stream
        for (qkv, o, gate_up, down), attend in zip(stack, attentions, strict=True):
            y = norm_product(h, *qkv, 1e-5)
            h = product_add(attend(y), *o, h)
            h = product_add(mlp_input(h, *gate_up), *down, h)
        return h

    return step, sum(q.numel() + s.numel() * 2 for layer in stack for q, s in layer)


def step_seconds(step: Callable, x: torch.Tensor, replays: int, repeats: int) -> list[float]:
    """Seconds per step: CUDA-graph replays on CUDA, plain calls elsewhere."""
    cuda = x.device.type == "cuda"
    if cuda:
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            for _ in range(3):
                step(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(x)
        run = graph.replay
    else:
        run = lambda: step(x)  # noqa: E731
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / replays)
        else:
            t0 = time.perf_counter()
            for _ in range(replays):
                run()
            times.append((time.perf_counter() - t0) / replays)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-8b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="default: the model's layer count")
    parser.add_argument("--quant", default="bf16,int8,int4")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default="", help="a name for this source tree in the output")
    parser.add_argument(
        "--attention", default="none", help=f"comma-separated, each run in turn: {', '.join(ATTENTIONS)}"
    )
    parser.add_argument("--cache-len", type=int, default=256, help="positions of each layer's cache (--attention)")
    parser.add_argument("--filled", type=int, default=192, help="of them filled before the new token (--attention)")
    args = parser.parse_args()
    quants, attentions = args.quant.split(","), args.attention.split(",")
    if any(a not in ATTENTIONS for a in attentions):
        print(f"--attention takes a comma-separated list of {', '.join(ATTENTIONS)}.", file=sys.stderr)
        return 2
    if any(
        q.removesuffix("+tiles") not in QUANTS or (q.endswith("+tiles") and not q.startswith("int8")) for q in quants
    ):
        print(f"--quant takes a comma-separated list of {', '.join(QUANTS)}.", file=sys.stderr)
        return 2
    if any(q.startswith("int4") for q in quants) and not all(
        k % GROUP == 0 and linear_int4_mma.takes(n, k, GROUP) for n, k in linear_shapes(args.model)
    ):
        print(f"{args.model}'s linears do not fit int4 groups of {GROUP}; leave int4 out.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # the kernel libraries the chains run, compiled (or loaded) before any is timed
        if any(q.startswith("int8") for q in quants):
            linear_int8_gemv.load_extension()
        if any(q.startswith("int4") for q in quants):
            linear_int4_mma.load_extension()
        if "prefetched" in attentions:
            prefetched_decode_attention.load_extension()
    layers = args.layers or PRESETS[args.model]["num_hidden_layers"]
    copy = copy_bandwidth_gbs(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, {layers} layers, batch 1, on {name}; copy bandwidth {copy:.1f} GB/s {args.label}")
    print("| linears | attention | step us (min-max) | weight GB | GB/s | share of copy |")
    print("|---|---|---:|---:|---:|---:|")
    x = torch.randn(1, linear_shapes(args.model)[0][1], device=device, dtype=torch.bfloat16)
    for quant in quants:
        for attention in attentions:
            step, nbytes = make_step(quant, args.model, layers, device, attention, args.cache_len, args.filled)
            times = step_seconds(step, x, args.replays, args.repeats)
            median = statistics.median(times)
            print(
                f"| {quant} | {attention} | {median * 1e6:.1f} ({min(times) * 1e6:.1f}-{max(times) * 1e6:.1f}) "
                f"| {nbytes / 1e9:.2f} | {nbytes / median / 1e9:.0f} | {nbytes / median / 1e9 / copy:.1%} |",
                flush=True,
            )
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
