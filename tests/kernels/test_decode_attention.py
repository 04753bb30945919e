"""oiv2::decode_attention (the C++ cluster kernel of a decode step) against the float64 oracle of
oiv2::attention, on fresh random inputs: odd cache lengths and filled lengths (an eighth of the
filled positions per CTA, so most CTAs of a short fill read nothing), groups of 1 to 8, head sizes
64 and 128, bf16 and fp16, a transposed q as HF gives it; plus opcheck and which calls it takes."""

from __future__ import annotations

import math

import pytest
import torch

from oiv2compile.kernels import decode_attention as decode_attention_mod
from tests.kernels.test_attention import oracle

# (batch, q heads, kv heads, head dim, cache length, positions: the new token's, filled = position + 1)
SHAPES = [
    (1, 32, 8, 128, 256, [127]),  # llama-8b, half filled
    (1, 32, 8, 128, 256, [255]),  # full
    (1, 32, 8, 128, 256, [0]),  # one position: seven CTAs read nothing
    (3, 32, 8, 128, 1024, [1023, 5, 700]),  # the longest cache, positions per CTA from 1 to 128
    (2, 8, 8, 64, 100, [99, 41]),  # no GQA, head size 64, a cache length not a multiple of 8
    (2, 24, 3, 64, 40, [9, 17]),  # group 8
    (1, 6, 2, 128, 256, [300]),  # a position past the cache: the whole cache
]


def _inputs(shape, dtype, device, seed):
    B, Hq, Hkv, D, T, positions = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hq, D, generator=gen).transpose(1, 2)  # a transposed view
    k_cache = torch.randn(B + 2, Hkv, T, D, generator=gen)
    v_cache = torch.randn(B + 2, Hkv, T, D, generator=gen)
    slots = torch.randperm(B + 2, generator=gen)[:B]
    return [
        x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        for x in (q, k_cache, v_cache, slots, torch.tensor(positions))
    ]


def test_reference_is_attentions_at_one_token():
    q, k, v, slots, positions = _inputs(SHAPES[4], torch.float32, "cpu", 0)
    out = torch.ops.oiv2.decode_attention(q, k, v, slots, positions, 0.125)
    torch.testing.assert_close(out, torch.ops.oiv2.attention(q, k, v, slots, positions, 0.125))
    expected = oracle(q, k, v, slots, positions, 0.125)
    assert (out.double() - expected).abs().max() < 1e-5


def test_opcheck_cpu():
    q, k, v, slots, positions = _inputs(SHAPES[5], torch.float32, "cpu", 1)
    torch.library.opcheck(torch.ops.oiv2.decode_attention.default, (q, k, v, slots, positions, 0.25))


def test_takes():
    takes = decode_attention_mod.takes
    q = torch.empty(1, 32, 1, 128, dtype=torch.bfloat16)
    cache = torch.empty(1, 8, 256, 128, dtype=torch.bfloat16)
    assert takes(q, cache)
    assert takes(q.half(), cache.half())
    assert not takes(q.float(), cache.float())  # float32: the Triton kernel
    assert not takes(torch.empty(1, 32, 2, 128, dtype=torch.bfloat16), cache)  # two new tokens
    assert not takes(q, torch.empty(1, 8, 1025, 128, dtype=torch.bfloat16))  # longer than 8 * 128
    assert not takes(torch.empty(1, 72, 1, 128, dtype=torch.bfloat16), cache)  # group of 9
    assert not takes(torch.empty(1, 32, 1, 96, dtype=torch.bfloat16), torch.empty(1, 8, 256, 96))
    assert not takes(q, cache.half())


def _load():
    decode_attention_mod.load_extension()


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_matches_oracle_cuda(shape, dtype, tol):
    _load()
    q, k, v, slots, positions = _inputs(shape, dtype, "cuda", seed=3)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.ops.oiv2.decode_attention(q, k, v, slots, positions, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    expected = oracle(q, k, v, slots, positions, scale)
    err = (out.double().cpu() - expected).norm() / expected.norm()
    assert err < tol, f"relative error {err:.2e}"
    # Only the filled part is read: garbage past each sequence's position changes nothing.
    k2, v2 = k.clone(), v.clone()
    for b, slot in enumerate(slots.tolist()):
        k2[slot, :, int(positions[b]) + 1 :] = 1e4
        v2[slot, :, int(positions[b]) + 1 :] = float("nan")
    torch.testing.assert_close(torch.ops.oiv2.decode_attention(q, k2, v2, slots, positions, scale), out)


@pytest.mark.cuda
def test_opcheck_cuda():
    _load()
    q, k, v, slots, positions = _inputs(SHAPES[3], torch.bfloat16, "cuda", 4)
    torch.library.opcheck(torch.ops.oiv2.decode_attention.default, (q, k, v, slots, positions, 0.25))


@pytest.mark.cuda
def test_replays_in_a_cuda_graph_with_new_positions():
    """Captured once, replayed with other positions and slots written in place: as the executor runs it."""
    _load()
    q, k, v, slots, positions = _inputs((2, 32, 8, 128, 256, [10, 200]), torch.bfloat16, "cuda", 5)
    torch.ops.oiv2.decode_attention(q, k, v, slots, positions, 0.1)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.oiv2.decode_attention(q, k, v, slots, positions, 0.1)
    for new in ([255, 0], [63, 129], [7, 8]):
        positions.copy_(torch.tensor(new))
        slots.copy_(slots.flip(0))
        graph.replay()
        torch.testing.assert_close(out, torch.ops.oiv2.attention(q, k, v, slots, positions, 0.1), atol=2e-2, rtol=2e-2)
