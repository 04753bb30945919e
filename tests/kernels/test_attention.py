"""oiv2::attention against an independent float64 oracle, on fresh random inputs of several shapes."""

from __future__ import annotations

import math

import pytest
import torch

from oiv2compile.kernels import attention_ref

# (batch, q heads, kv heads, new tokens, head dim, cache length, start positions)
SHAPES = [
    (1, 4, 2, 1, 16, 64, [0]),  # length 1: the first token sees itself only
    (3, 4, 2, 1, 16, 64, [5, 0, 62]),  # decode, lengths not divisible by the block
    (2, 6, 3, 5, 24, 50, [7, 40]),  # odd head size, chunk after a prefix
    (2, 14, 2, 37, 64, 128, [0, 50]),  # prefill, group of 7
    (1, 8, 8, 70, 32, 100, [0]),  # no GQA, more tokens than one block
]


def oracle(q, k_cache, v_cache, slots, positions, scale):
    """Loop over sequences and heads in float64: the definition, written differently from the op."""
    B, Hq, S, D = q.shape
    Hkv = k_cache.shape[1]
    out = torch.empty(B, Hq, S, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            for t in range(S):
                end = int(positions[b]) + t + 1
                k = k_cache[slots[b], kv, :end].double().cpu()
                v = v_cache[slots[b], kv, :end].double().cpu()
                w = torch.softmax(k @ q[b, h, t].double().cpu() * scale, dim=0)
                out[b, h, t] = w @ v
    return out


def _inputs(shape, dtype, device, seed):
    B, Hq, Hkv, S, D, T, starts = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=gen).transpose(1, 2)  # a transposed view, as HF gives it
    k_cache = torch.randn(B + 2, Hkv, T, D, generator=gen)
    v_cache = torch.randn(B + 2, Hkv, T, D, generator=gen)
    slots = torch.randperm(B + 2, generator=gen)[:B]
    positions = torch.tensor(starts)
    return [
        x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        for x in (q, k_cache, v_cache, slots, positions)
    ]


def _check(shape, dtype, device, tol, seed):
    q, k, v, slots, positions = _inputs(shape, dtype, device, seed)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.ops.oiv2.attention(q, k, v, slots, positions, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    expected = oracle(q, k, v, slots, positions, scale)
    err = (out.double().cpu() - expected).norm() / expected.norm()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_oracle_cpu(shape):
    _check(shape, torch.float32, "cpu", 1e-5, seed=hash(str(shape)) % 1000)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_opcheck(shape):
    q, k, v, slots, positions = _inputs(shape, torch.float32, "cpu", 0)
    torch.library.opcheck(torch.ops.oiv2.attention.default, (q, k, v, slots, positions, 0.25))


def test_reference_reads_only_the_filled_part():
    """Garbage past each sequence's position must not change the result."""
    q, k, v, slots, positions = _inputs(SHAPES[2], torch.float32, "cpu", 1)
    before = attention_ref(q, k, v, slots, positions, 0.2)
    k2, v2 = k.clone(), v.clone()
    for b, slot in enumerate(slots.tolist()):
        end = int(positions[b]) + q.shape[2]
        k2[slot, :, end:] = 1e4
        v2[slot, :, end:] = float("nan")
    torch.testing.assert_close(attention_ref(q, k2, v2, slots, positions, 0.2), before)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [*SHAPES, (1, 32, 8, 1, 128, 4096, [3000]), (4, 32, 8, 128, 128, 512, [0, 0, 0, 0])])
@pytest.mark.parametrize(
    ("dtype", "tol"),
    # float32 runs the Triton kernel with IEEE dot products; bfloat16 inputs round at 2^-8, and
    # the kernel rounds the softmax weights to bfloat16 before the second product.
    [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
)
def test_attention_matches_oracle_cuda(shape, dtype, tol):
    _check(shape, dtype, "cuda", tol, seed=7)


@pytest.mark.cuda
def test_opcheck_cuda():
    q, k, v, slots, positions = _inputs(SHAPES[1], torch.bfloat16, "cuda", 0)
    torch.library.opcheck(torch.ops.oiv2.attention.default, (q, k, v, slots, positions, 0.25))
