"""oiv2::kv_write against a loop oracle, on fresh random inputs of several shapes."""

from __future__ import annotations

import pytest
import torch

SHAPES = [
    # (batch, heads, new tokens, head dim, cache length, start positions)
    (1, 2, 1, 16, 32, [0]),
    (3, 2, 1, 16, 32, [31, 0, 7]),
    (2, 3, 9, 24, 40, [0, 31]),
    (2, 8, 128, 128, 256, [0, 100]),
]


def _inputs(shape, dtype, device, seed):
    B, H, S, D, T, starts = shape
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(B + 1, H, T, D, generator=gen).to(device=device, dtype=dtype)
    values = torch.randn(B, S, H, D, generator=gen).transpose(1, 2).to(device=device, dtype=dtype)
    slots = torch.randperm(B + 1, generator=gen)[:B].to(device)
    positions = torch.tensor(starts, device=device)
    return cache, values, slots, positions


def oracle(cache, values, slots, positions):
    out = cache.clone()
    for b in range(values.shape[0]):
        for t in range(values.shape[2]):
            out[slots[b], :, positions[b] + t] = values[b, :, t]
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_write_matches_oracle(shape, dtype, device):
    cache, values, slots, positions = _inputs(shape, dtype, device, seed=len(str(shape)))
    expected = oracle(cache, values, slots, positions)
    result = torch.ops.oiv2.kv_write(cache, values, slots, positions)
    assert result is None
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)  # a copy: exact


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    cache, values, slots, positions = _inputs(SHAPES[2], torch.float32, device, 0)
    torch.library.opcheck(torch.ops.oiv2.kv_write.default, (cache, values, slots, positions))


@pytest.mark.cuda
def test_cuda_kernel_drops_writes_past_the_cache():
    cache, values, slots, positions = _inputs(SHAPES[2], torch.float32, "cuda", 0)
    positions = torch.tensor([35, 0], device="cuda")  # 35 + 9 > 40: the last 4 tokens fall off
    before = cache.clone()
    torch.ops.oiv2.kv_write(cache, values, slots, positions)
    torch.testing.assert_close(cache[slots[0], :, 35:], values[0, :, :5], rtol=0, atol=0)
    others = torch.ones(cache.shape[0], dtype=torch.bool, device="cuda")
    others[slots] = False
    torch.testing.assert_close(cache[others], before[others], rtol=0, atol=0)
