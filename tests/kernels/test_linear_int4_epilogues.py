"""The int4 products with an epilogue: oiv2::linear_int4_mma_add, oiv2::rms_norm_linear_int4_mma and
oiv2::rms_norm_linear_int4_mma_gated_act, against float64 oracles of the weights they stand for, against
the plain product with the epilogue apart, and opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oiv2compile.kernels import linear_int4_mma as mma
from oiv2compile.kernels.gated_act import ACTIVATIONS, gated_act_ref
from oiv2compile.kernels.linear_int4 import dequantize, quantize, unpack
from oiv2compile.kernels.linear_int4_mma_add import linear_int4_mma_add_ref
from oiv2compile.kernels.rms_norm_linear_int4_mma import rms_norm_linear_int4_mma_ref
from oiv2compile.kernels.rms_norm_linear_int4_mma_gated_act import rms_norm_linear_int4_mma_gated_act_ref

ops = torch.ops.oiv2


def _case(rows: int, n: int, k: int, group: int, dtype: torch.dtype, device: str, seed: int):  # type: ignore[no-untyped-def]
    """x [rows, k] and a random weight [n, k] in int4-mma16x64-v1 with its float64 dequantized values."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=gen) * 3).to(device, dtype)
    w = torch.randn(n, k, generator=gen) * 0.02 + torch.randn(n, 1, generator=gen) * 0.005
    packed, scales, zeros = quantize(w.to(device), group, dtype)
    weight = dequantize(packed, scales, zeros).double()
    return x, mma.pack(unpack(packed, group)), mma.scale_zero(scales, zeros), weight


def _normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _rel(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_int4_epilogue_references_against_float64_and_opcheck(activation):
    x, packed, pairs, weight = _case(3, 2 * 48, 128, 64, torch.float32, "cpu", 1)
    residual = torch.randn(3, 2 * 48)
    code = ACTIVATIONS.index(activation)
    for op, args in (
        (ops.linear_int4_mma_add.default, (x, packed, pairs, residual)),
        (ops.rms_norm_linear_int4_mma.default, (x, packed, pairs, 1e-5)),
        (ops.rms_norm_linear_int4_mma_gated_act.default, (x, packed, pairs, 1e-5, code)),
    ):
        torch.library.opcheck(op, args)
    added = linear_int4_mma_add_ref(x, packed, pairs, residual)
    assert _rel(added, F.linear(x.double(), weight) + residual.double()) < 1e-6
    normed = rms_norm_linear_int4_mma_ref(x, packed, pairs, 1e-5)
    assert normed.shape == (3, 96) and _rel(normed, F.linear(_normed(x, 1e-5), weight)) < 1e-6
    gated = rms_norm_linear_int4_mma_gated_act_ref(x, packed, pairs, 1e-5, code)
    assert gated.shape == (3, 48)
    assert _rel(gated, gated_act_ref(F.linear(_normed(x, 1e-5), weight), activation)) < 1e-5


def test_int4_epilogue_ops_keep_leading_dimensions():
    x, packed, pairs, _ = _case(6, 64, 128, 128, torch.float32, "cpu", 2)
    x3 = x.reshape(2, 3, 128)
    assert ops.linear_int4_mma_add(x3, packed, pairs, torch.zeros(2, 3, 64)).shape == (2, 3, 64)
    assert ops.rms_norm_linear_int4_mma(x3, packed, pairs, 1e-5).shape == (2, 3, 64)
    assert ops.rms_norm_linear_int4_mma_gated_act(x3, packed, pairs, 1e-5, 0).shape == (2, 3, 32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int4_epilogues_cuda_kernel(rows, group, dtype):
    """The streamed kernel's epilogues on N = 2016 (63 gate and 63 up blocks of 16) and K = 4224 (66
    chunks): each against the float64 oracle, and against the plain product with the epilogue apart
    (the same roundings, up to the order of the float sums)."""
    mma.load_extension()
    n, k, eps = 2016, 4224, 1e-5
    x, packed, pairs, weight = _case(rows, n, k, group, dtype, "cuda", rows * group)
    residual = torch.randn(rows, n, device="cuda").to(dtype)
    plain = ops.linear_int4_mma(x, packed, pairs)

    added = ops.linear_int4_mma_add(x, packed, pairs, residual)
    assert added.dtype == dtype and added.shape == (rows, n)
    assert _rel(added, F.linear(x.double(), weight) + residual.double()) < 5e-3
    torch.testing.assert_close(added, plain + residual, rtol=1e-2, atol=1e-2)

    normed = ops.rms_norm_linear_int4_mma(x, packed, pairs, eps)
    expected = F.linear(_normed(x, eps), weight)
    assert normed.shape == (rows, n) and _rel(normed, expected) < 5e-3

    for activation in ACTIVATIONS:
        code = ACTIVATIONS.index(activation)
        gated = ops.rms_norm_linear_int4_mma_gated_act(x, packed, pairs, eps, code)
        assert gated.dtype == dtype and gated.shape == (rows, n // 2)
        # Four roundings to x's dtype (gate, up, the activation, the product) that the oracle does not make.
        bound = 1e-2 if dtype == torch.bfloat16 else 5e-3
        assert _rel(gated, gated_act_ref(expected, activation)) < bound
        apart = ops.gated_act(normed, activation)
        torch.testing.assert_close(gated, apart, rtol=2e-2, atol=2e-3)
    for op, args in (
        (ops.linear_int4_mma_add.default, (x, packed, pairs, residual)),
        (ops.rms_norm_linear_int4_mma.default, (x, packed, pairs, eps)),
        (ops.rms_norm_linear_int4_mma_gated_act.default, (x, packed, pairs, eps, 0)),
    ):
        torch.library.opcheck(op, args)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_gated_act_kernel_over_many_outputs_a_cta(rows):
    """N = 35200 (1100 gate and 1100 up blocks: more than the SMs hold CTAs, so a CTA takes several
    pairs, split unevenly) and K = 4160 (65 chunks: each block's last stage holds one chunk)."""
    mma.load_extension()
    n, k, eps = 35200, 4160, 1e-5
    x, packed, pairs, weight = _case(rows, n, k, 64, torch.bfloat16, "cuda", 40 + rows)
    expected = gated_act_ref(F.linear(_normed(x, eps), weight), "silu")
    out = ops.rms_norm_linear_int4_mma_gated_act(x, packed, pairs, eps, 0)
    per_feature = (out.double() - expected).abs().amax(dim=0) / expected.abs().amax()
    assert float(per_feature.max()) < 3e-2  # no output left out, or paired with another's up row
    assert _rel(out, expected) < 1e-2


@pytest.mark.cuda
def test_int4_epilogue_ops_refuse_more_than_eight_rows():
    mma.load_extension()
    x, packed, pairs, _ = _case(9, 64, 128, 128, torch.bfloat16, "cuda", 3)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        ops.rms_norm_linear_int4_mma(x, packed, pairs, 1e-5)
