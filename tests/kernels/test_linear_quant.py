"""oiv2::linear_int8 and oiv2::linear_int4: the layouts, the ops against float64 oracles of the
weights they stand for, opcheck, and the error they add (SQNR against the float linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oiv2compile.kernels.linear_int4 import dequantize as dequantize_int4
from oiv2compile.kernels.linear_int4 import pack, unpack
from oiv2compile.kernels.linear_int4 import quantize as quantize_int4
from oiv2compile.kernels.linear_int8 import dequantize as dequantize_int8
from oiv2compile.kernels.linear_int8 import quantize as quantize_int8

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# (rows of x, output features, input features): odd sizes, a 3-D input, a decoder-sized one.
SHAPES = [((1,), 96, 64), ((3,), 1000, 384), ((2, 5), 33, 128), ((7,), 512, 1024)]


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.02 + torch.randn(n, 1, generator=gen) * 0.005


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_int8_layout():
    w = _weight(37, 64, 0)
    q, scales = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (37,)
    assert int(q.abs().max()) == 127  # each row's largest weight maps to ±127
    err = (dequantize_int8(q, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())  # round to nearest


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_layout(group):
    w = _weight(37, 256, group)
    packed, scales, zeros = quantize_int4(w, group, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 128)
    assert scales.shape == zeros.shape == (37, 256 // group)
    assert bool((zeros == zeros.round()).all()) and 0 <= float(zeros.min()) and float(zeros.max()) <= 15
    q = unpack(packed)
    assert int(q.max()) <= 15 and torch.equal(pack(q), packed)
    assert torch.equal(unpack(torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)), torch.tensor([[1, 2, 0, 15]]))
    # Each weight is within half a step of its group's levels, or clipped at the group's range.
    err = (dequantize_int4(packed, scales, zeros) - w).abs().reshape(37, -1, group)
    half_step = scales[..., None] / 2
    assert float((err <= half_step + 1e-7).double().mean()) > 0.97


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_the_weights_they_stand_for(shape, dtype, device):
    rows, n, k = shape
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(*rows, k, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    w = _weight(n, k, k).to(device)
    tol = 1e-5 if dtype is torch.float32 else 2e-2

    q, scales = quantize_int8(w, dtype)
    expected = F.linear(x.double(), dequantize_int8(q, scales).double(), bias.double())
    out = torch.ops.oiv2.linear_int8(x, q, scales, bias)
    assert out.dtype == dtype and out.shape == (*rows, n)
    assert (out.double() - expected).norm() / expected.norm() < tol

    packed, scales4, zeros = quantize_int4(w, 32, dtype)
    expected = F.linear(x.double(), dequantize_int4(packed, scales4, zeros).double())
    out = torch.ops.oiv2.linear_int4(x, packed, scales4, zeros)
    assert out.dtype == dtype and out.shape == (*rows, n)
    assert (out.double() - expected).norm() / expected.norm() < tol


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 64, device=device)
    w = _weight(48, 64, 1).to(device)
    q, scales = quantize_int8(w, torch.float32)
    torch.library.opcheck(torch.ops.oiv2.linear_int8.default, (x, q, scales, None))
    packed, scales4, zeros = quantize_int4(w, 32, torch.float32)
    torch.library.opcheck(torch.ops.oiv2.linear_int4.default, (x, packed, scales4, zeros, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sqnr_against_the_float_linear(dtype, device):
    """Per-layer error on random weights of a decoder's shape: int8 ≥ 40 dB, int4 ≥ 20 dB (group 128)."""
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(1024, 2048, generator=gen) * 0.02).to(device)
    x = torch.randn(16, 2048, generator=gen).to(device)
    ref = F.linear(x.double(), w.double())
    q, scales = quantize_int8(w.to(dtype), dtype)
    assert sqnr_db(ref, torch.ops.oiv2.linear_int8(x.to(dtype), q, scales)) >= 40.0
    results = {}
    for group in (32, 64, 128):
        packed, scales4, zeros = quantize_int4(w.to(dtype), group, dtype)
        results[group] = sqnr_db(ref, torch.ops.oiv2.linear_int4(x.to(dtype), packed, scales4, zeros))
    assert results[128] >= 20.0
    assert results[32] > results[64] > results[128]  # smaller groups, smaller error
