"""oiv2::cached_attention (the ONNX backend's functional form) against kv_write and attention, on fresh
random inputs of several shapes; its inputs are left unchanged."""

from __future__ import annotations

import pytest
import torch

import oiv2compile.kernels  # noqa: F401
from oiv2compile.kernels.attention import attention_ref
from oiv2compile.kernels.cached_attention import cached_attention
from oiv2compile.kernels.kv_write import kv_write_ref

SHAPES = [
    # (batch, query heads, kv heads, new tokens, head dim, cache length, start positions)
    (1, 4, 2, 1, 16, 32, [5]),
    (3, 6, 2, 1, 8, 24, [23, 0, 7]),
    (2, 4, 4, 7, 12, 40, [0, 0]),
]


def _inputs(shape, seed):
    B, Hq, Hkv, S, D, T, starts = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=gen).transpose(1, 2)  # [B, Hq, S, D], a transposed view as in HF
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    k_cache = torch.randn(B, Hkv, T, D, generator=gen)
    v_cache = torch.randn(B, Hkv, T, D, generator=gen)
    return q, k, v, k_cache, v_cache, torch.tensor(starts)


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_attention_equals_kv_write_then_attention(shape):
    q, k, v, k_cache, v_cache, positions = _inputs(shape, seed=len(str(shape)))
    before = (k_cache.clone(), v_cache.clone())
    out, k_out, v_out = cached_attention(q, k, v, k_cache, v_cache, positions, 0.3, q.shape[1], k.shape[1])
    rows = torch.arange(q.shape[0])
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    kv_write_ref(k_expected, k, rows, positions)
    kv_write_ref(v_expected, v, rows, positions)
    torch.testing.assert_close(k_out, k_expected, rtol=0, atol=0)
    torch.testing.assert_close(v_out, v_expected, rtol=0, atol=0)
    torch.testing.assert_close(out, attention_ref(q, k_expected, v_expected, rows, positions, 0.3))
    torch.testing.assert_close((k_cache, v_cache), before, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_cached_attention_opcheck(shape):
    args = (*_inputs(shape, seed=1), 0.3, shape[1], shape[2])
    torch.library.opcheck(torch.ops.oiv2.cached_attention.default, args)
