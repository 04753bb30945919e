"""oiv2::rope_kv_write against a loop oracle in float64, on fresh random inputs of several shapes.

The Triton kernel runs on a GPU (the `cuda` tests) and in Triton's CPU interpreter (`interpreted`,
under TRITON_INTERPRET=1: `make test-interpret`).
"""

from __future__ import annotations

import importlib

import pytest
import torch

rope_mod = importlib.import_module("oiv2compile.kernels.rope_kv_write")
HAS_TRITON = rope_mod.HAS_TRITON
INTERPRETED = HAS_TRITON and type(rope_mod._rope_kv_write_kernel).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (make test-interpret)")

# (batch, new tokens, q heads, kv heads, head dim, cache length, start positions)
SHAPES = [
    (1, 1, 32, 8, 64, 256, [100]),  # a llama-1b decode step
    (3, 1, 4, 2, 16, 32, [31, 0, 7]),  # the last position of the cache
    (2, 5, 6, 2, 24, 40, [0, 30]),  # prefill, odd head size (half 12: a padded block)
    (2, 3, 3, 3, 128, 16, [0, 5]),  # no GQA, D = 128
    (1, 2, 9, 1, 8, 8, [3]),  # heads not a multiple of the kernel's block of 8
    (2, 4, 4, 2, 16, 16, [14, 0]),  # the first sequence's last two tokens fall past the cache
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, device, seed, rotary="ids"):
    """rotary "ids": position ids of their own (3 past the cache positions, wrapping at T), so a
    kernel that read the cache positions instead would fail; "cache": None, the cache positions."""
    B, S, Hq, Hkv, D, T, starts = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, generator=gen)
    angles = torch.randn(T, D // 2, generator=gen) * 3  # a table row per position
    k_cache = torch.randn(B + 1, Hkv, T, D, generator=gen)
    v_cache = torch.randn(B + 1, Hkv, T, D, generator=gen)
    slots = torch.randperm(B + 1, generator=gen)[:B]
    position_ids = (torch.tensor(starts)[:, None] + torch.arange(S)[None, :] + 3) % T if rotary == "ids" else None
    qkv, cos, sin, k_cache, v_cache = (
        t.to(device=device, dtype=dtype) for t in (qkv, angles.cos(), angles.sin(), k_cache, v_cache)
    )
    positions = torch.tensor(starts, device=device)
    position_ids = position_ids.to(device) if position_ids is not None else None
    return qkv, cos, sin, position_ids, k_cache, v_cache, slots.to(device), positions, Hq, Hkv


def oracle(qkv, cos_table, sin_table, position_ids, k_cache, v_cache, slots, positions, num_heads, num_kv_heads):
    """Per token and head in float64, rotating pairs (i, i + D/2) as a 2-D rotation by the table row
    at the token's rotary position (position_ids, or the cache position, kept in the table for the
    tokens whose cache write falls off the end); returns (q [B, Hq, S, D], caches after), dropping
    writes past the cache's end."""
    B, S, width = qkv.shape
    D = width // (num_heads + 2 * num_kv_heads)
    half = D // 2
    q = torch.empty(B, num_heads, S, D, dtype=torch.float64)
    k_out, v_out = k_cache.double().cpu().clone(), v_cache.double().cpu().clone()
    x, c_table, s_table = qkv.double().cpu(), cos_table.double().cpu(), sin_table.double().cpu()
    for b in range(B):
        for t in range(S):
            pos = int(positions[b]) + t
            at = min(pos, cos_table.shape[0] - 1) if position_ids is None else int(position_ids[b, t])
            c, s = c_table[at], s_table[at]  # [D/2]
            for h in range(num_heads + 2 * num_kv_heads):
                row = x[b, t, h * D : (h + 1) * D]
                a, z = row[:half], row[half:]
                rotated = torch.cat((a * c - z * s, z * c + a * s))
                if h < num_heads:
                    q[b, h, t] = rotated
                elif pos < k_cache.shape[2] and h < num_heads + num_kv_heads:
                    k_out[slots[b], h - num_heads, pos] = rotated
                elif pos < k_cache.shape[2]:
                    v_out[slots[b], h - num_heads - num_kv_heads, pos] = row
    return q, k_out, v_out


def _check(shape, dtype, device, call, rotary="ids"):
    args = _inputs(shape, dtype, device, seed=len(str(shape)), rotary=rotary)
    want_q, want_k, want_v = oracle(*args)
    k_cache, v_cache = args[4], args[5]
    q = call(*args)
    assert q.shape == want_q.shape and q.dtype == dtype and q.is_contiguous()
    tol = TOLERANCE[dtype]
    for got, want in ((q, want_q), (k_cache, want_k), (v_cache, want_v)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


ROTARY = ["ids", "cache"]


@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_oracle(shape, dtype, rotary):
    _, S, _, _, _, T, starts = shape
    if max(starts) + S > T:
        pytest.skip("the reference raises on writes past the cache; the CUDA kernel drops them")
    _check(shape, dtype, "cpu", torch.ops.oiv2.rope_kv_write, rotary)


@pytest.mark.cuda
@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_matches_oracle(shape, dtype, rotary):
    _check(shape, dtype, "cuda", torch.ops.oiv2.rope_kv_write, rotary)


@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device, rotary):
    args = _inputs(SHAPES[2], torch.float32, device, 0, rotary)
    torch.library.opcheck(torch.ops.oiv2.rope_kv_write.default, args)


@pytest.fixture
def interpret_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch the interpreted kernel directly: wrap_triton wants a compiled JITFunction."""
    monkeypatch.setattr(rope_mod, "wrap_triton", lambda kernel: kernel)


@interpreted
@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_oracle_interpreted(shape, dtype, rotary, interpret_kernel):
    _check(shape, dtype, "cpu", rope_mod._rope_kv_write_triton, rotary)


def test_tables_hold_hugging_faces_cos_and_sin():
    """rotary_tables against the rotary embedding of a Llama config (llama3 frequency scaling
    included), at every position, in bf16 as the model would round them."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    rotary = LlamaRotaryEmbedding(config)
    length = 200
    x = torch.zeros(1, length, 16, dtype=torch.bfloat16)
    cos, sin = rotary(x, torch.arange(length)[None])  # [1, length, 16]
    cos_table, sin_table = rope_mod.rotary_tables(rotary.inv_freq, length, rotary.attention_scaling, torch.bfloat16)
    position_ids = torch.arange(length)[None]
    assert torch.equal(rope_mod.table_rows(cos_table, position_ids), cos)
    assert torch.equal(rope_mod.table_rows(sin_table, position_ids), sin)
