"""CUDA: the one-row products of llama-8b's decode layers launched back to back, as a decode step runs them.

Each streamed kernel (int8 at one row, int4) is launched as a programmatic dependent: its producer warp
copies weights while the kernel before it still runs, and its consumers wait for that kernel before they
read x. The op tests launch one product at a time after other work; here two layers' products (qkv with
the norm, o and down with the residual add, gate/up with the norm and the gated activation, at llama-8b's
sizes: every CTA sums several blocks) follow each other directly, eagerly and replayed from a CUDA graph,
and every output must have the same bits as when each product runs alone after a synchronize."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from oiv2compile.kernels import linear_int4_mma, linear_int8_gemv

pytestmark = pytest.mark.cuda

ops = torch.ops.oiv2
HIDDEN, QKV, INTER, GROUP = 4096, 6144, 14336, 128  # llama-8b: 32 q heads, 8 kv heads of 128


def _weights(bits: str, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights in the op's layout: int8-rowmajor-v1 (rows, scales) or int4-mma16x64-v1 (packed, pairs)."""
    if bits == "int8":
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        return q.cuda(), (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to("cuda", torch.bfloat16)
    levels = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8).cuda()
    scales = (torch.rand(n, k // GROUP, generator=gen) * 1e-3 + 1e-4).to("cuda", torch.bfloat16)
    zeros = torch.randint(6, 10, (n, k // GROUP), generator=gen).to("cuda", torch.bfloat16)
    return linear_int4_mma.pack(levels), linear_int4_mma.scale_zero(scales, zeros)


def _layers_step(bits: str, layers: int) -> Callable[[torch.Tensor, bool], list[torch.Tensor]]:
    """step(x, alone): `layers` layers of products on one row x [1, HIDDEN], every output in order; with
    alone, a synchronize after each product (no launch overlaps the one before)."""
    suffix = "int8_gemv" if bits == "int8" else "int4_mma"
    norm_product = getattr(ops, f"rms_norm_linear_{suffix}")
    product_add = getattr(ops, f"linear_{suffix}_add")
    norm_product_act = getattr(ops, f"rms_norm_linear_{suffix}_gated_act")
    gen = torch.Generator().manual_seed(30 if bits == "int8" else 31)
    shapes = ((QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER))
    stack = [[_weights(bits, n, k, gen) for n, k in shapes] for _ in range(layers)]

    def step(x: torch.Tensor, alone: bool) -> list[torch.Tensor]:
        outputs, h = [], x

        def record(y: torch.Tensor) -> torch.Tensor:
            if alone:
                torch.cuda.synchronize()
            outputs.append(y)
            return y

        for qkv, o, gate_up, down in stack:
            y = record(norm_product(h, *qkv, 1e-5))
            h = record(product_add(y[:, :HIDDEN].contiguous(), *o, h))  # attention's output stands in for q
            a = record(norm_product_act(h, *gate_up, 1e-5, 0))
            h = record(product_add(a, *down, h))
        return outputs

    return step


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_products_back_to_back_give_the_bits_of_each_alone(bits):
    (linear_int8_gemv if bits == "int8" else linear_int4_mma).load_extension()
    step = _layers_step(bits, layers=2)
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    alone = step(x, True)
    assert all(bool(torch.isfinite(y).all()) for y in alone)
    assert [tuple(y.shape) for y in alone[:4]] == [(1, QKV), (1, HIDDEN), (1, INTER), (1, HIDDEN)]
    for _ in range(3):  # eager, no synchronize between the products
        eager = step(x, False)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(eager, alone, strict=True))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step(x, False)  # warm-up on a side stream, as graph capture wants
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = step(x, False)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(replayed, alone, strict=True))
