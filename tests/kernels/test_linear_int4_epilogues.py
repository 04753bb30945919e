"""The int4 products with an epilogue, oiv2::linear_int4_mma_add, oiv2::rms_norm_linear_int4_mma and
oiv2::rms_norm_linear_int4_mma_gated_act: against float64 oracles of the weights they stand for, against
the plain product with the epilogue apart, and opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oiv2compile.kernels import linear_int4_mma as mma
from oiv2compile.kernels.gated_act import ACTIVATIONS
from oiv2compile.kernels.linear_int4 import dequantize, quantize, unpack
from oiv2compile.kernels.linear_int4_mma_add import linear_int4_mma_add_ref
from oiv2compile.kernels.rms_norm_linear_int4_mma import rms_norm_linear_int4_mma_ref
from oiv2compile.kernels.rms_norm_linear_int4_mma_gated_act import (
    deinterleave,
    interleave_gate_up,
    interleaved_rows,
    rms_norm_linear_int4_mma_gated_act_ref,
)

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


def test_int4_epilogue_references_against_float64_and_opcheck():
    x, packed, pairs, weight = _case(3, 96, 128, 64, torch.float32, "cpu", 1)
    residual = torch.randn(3, 96)
    torch.library.opcheck(ops.linear_int4_mma_add.default, (x, packed, pairs, residual))
    torch.library.opcheck(ops.rms_norm_linear_int4_mma.default, (x, packed, pairs, 1e-5))
    added = linear_int4_mma_add_ref(x, packed, pairs, residual)
    assert _rel(added, F.linear(x.double(), weight) + residual.double()) < 1e-6
    normed = rms_norm_linear_int4_mma_ref(x, packed, pairs, 1e-5)
    assert normed.shape == (3, 96) and _rel(normed, F.linear(_normed(x, 1e-5), weight)) < 1e-6


def _gated(normed: torch.Tensor, weight: torch.Tensor, activation: int) -> torch.Tensor:
    """The float64 oracle of the gated op: weight [2I, K] with the gate rows first."""
    gate, up = F.linear(normed, weight).chunk(2, dim=-1)
    name = ACTIVATIONS[activation]
    act = F.silu(gate) if name == "silu" else F.gelu(gate, approximate="tanh" if name == "gelu_tanh" else "none")
    return act * up


def test_interleave_puts_an_outputs_gate_and_up_rows_in_one_block():
    assert interleaved_rows(16).tolist() == [*range(8), *range(16, 24), *range(8, 16), *range(24, 32)]
    with pytest.raises(ValueError, match="multiple of 8"):
        interleaved_rows(12)
    x, packed, pairs, _ = _case(2, 64, 128, 64, torch.float32, "cpu", 4)
    packed_i, pairs_i = interleave_gate_up(packed, pairs)
    order = interleaved_rows(32)
    assert torch.equal(mma.unpack(packed_i), mma.unpack(packed)[order])
    assert torch.equal(mma.dequantize(packed_i, pairs_i), mma.dequantize(packed, pairs)[order])
    # the product in interleaved order, deinterleaved, is the product of the weight as it was
    assert torch.equal(deinterleave(ops.linear_int4_mma(x, packed_i, pairs_i)), ops.linear_int4_mma(x, packed, pairs))


@pytest.mark.parametrize("activation", range(len(ACTIVATIONS)))
def test_int4_gated_reference_against_float64_and_opcheck(activation):
    x, packed, pairs, weight = _case(3, 96, 128, 64, torch.float32, "cpu", 5 + activation)
    packed_i, pairs_i = interleave_gate_up(packed, pairs)
    out = rms_norm_linear_int4_mma_gated_act_ref(x, packed_i, pairs_i, 1e-5, activation)
    assert out.shape == (3, 48) and _rel(out, _gated(_normed(x, 1e-5), weight, activation)) < 1e-5
    torch.library.opcheck(ops.rms_norm_linear_int4_mma_gated_act.default, (x, packed_i, pairs_i, 1e-5, activation))


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
    """The streamed kernel's epilogues on N = 1008 (63 blocks of 16) and K = 4224 (66 chunks): against
    the float64 oracle, and against the plain product with the epilogue apart: the same sums (the CTA's
    warps add theirs in a fixed order) and the same roundings, so the same bits."""
    mma.load_extension()
    n, k, eps = 1008, 4224, 1e-5
    x, packed, pairs, weight = _case(rows, n, k, group, dtype, "cuda", rows * group)
    residual = torch.randn(rows, n, device="cuda").to(dtype)
    plain = ops.linear_int4_mma(x, packed, pairs)
    added = ops.linear_int4_mma_add(x, packed, pairs, residual)
    assert added.dtype == dtype and added.shape == (rows, n)
    assert _rel(added, F.linear(x.double(), weight) + residual.double()) < 5e-3
    torch.testing.assert_close(added, plain + residual, rtol=0, atol=0)
    normed = ops.rms_norm_linear_int4_mma(x, packed, pairs, eps)
    assert normed.dtype == dtype and normed.shape == (rows, n)
    assert _rel(normed, F.linear(_normed(x, eps), weight)) < 5e-3
    torch.library.opcheck(ops.linear_int4_mma_add.default, (x, packed, pairs, residual))
    torch.library.opcheck(ops.rms_norm_linear_int4_mma.default, (x, packed, pairs, eps))


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_norm_kernel_over_many_blocks_a_cta(rows):
    """N = 17600 (1100 blocks: more than the SMs hold CTAs, so a CTA takes several, split unevenly) and
    K = 4224 (66 chunks: each block's last stage holds two)."""
    mma.load_extension()
    n, k, eps = 17600, 4224, 1e-5
    x, packed, pairs, weight = _case(rows, n, k, 64, torch.bfloat16, "cuda", 40 + rows)
    expected = F.linear(_normed(x, eps), weight)
    out = ops.rms_norm_linear_int4_mma(x, packed, pairs, eps)
    per_feature = (out.double() - expected).abs().amax(dim=0) / expected.abs().amax()
    assert float(per_feature.max()) < 2e-2  # no block of 16 rows left out or summed twice
    assert _rel(out, expected) < 5e-3
    residual = torch.randn(rows, n, device="cuda").to(torch.bfloat16)
    summed = ops.linear_int4_mma_add(x, packed, pairs, residual)
    assert _rel(summed, F.linear(x.double(), weight) + residual.double()) < 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", range(len(ACTIVATIONS)))
@pytest.mark.parametrize(("rows", "group"), [(1, 128), (3, 32), (8, 128)])
def test_int4_gated_cuda_kernel(rows, group, activation, dtype):
    """The gated epilogue on a fused gate/up weight of 2I = 1008 rows (63 blocks, I = 504) and K = 4224:
    against the float64 oracle, and against the norm's product, deinterleaved, through oiv2::gated_act
    (the same sums and roundings; the activation's float math may differ in a last bit)."""
    mma.load_extension()
    n, k, eps = 1008, 4224, 1e-5
    x, packed, pairs, weight = _case(rows, n, k, group, dtype, "cuda", 3 * rows + group + activation)
    packed_i, pairs_i = interleave_gate_up(packed, pairs)
    out = ops.rms_norm_linear_int4_mma_gated_act(x, packed_i, pairs_i, eps, activation)
    assert out.dtype == dtype and out.shape == (rows, n // 2)
    assert _rel(out, _gated(_normed(x, eps), weight, activation)) < 1e-2
    apart = ops.gated_act(
        deinterleave(ops.rms_norm_linear_int4_mma(x, packed_i, pairs_i, eps)), ACTIVATIONS[activation]
    )
    torch.testing.assert_close(out, apart, rtol=2e-2, atol=2e-2)
    torch.library.opcheck(ops.rms_norm_linear_int4_mma_gated_act.default, (x, packed_i, pairs_i, eps, activation))


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 8])
def test_int4_gated_kernel_over_many_blocks_a_cta(rows):
    """2I = 34000 (2125 blocks: a CTA takes several), K = 2112 (33 chunks: a short last stage); every
    output checked on its own (no block's gate or up rows left out, summed twice or paired wrongly)."""
    mma.load_extension()
    n, k, eps = 34000, 2112, 1e-5
    x, packed, pairs, weight = _case(rows, n, k, 64, torch.bfloat16, "cuda", 60 + rows)
    packed_i, pairs_i = interleave_gate_up(packed, pairs)
    expected = _gated(_normed(x, eps), weight, 0)
    out = ops.rms_norm_linear_int4_mma_gated_act(x, packed_i, pairs_i, eps, 0)
    per_feature = (out.double() - expected).abs().amax(dim=0) / expected.abs().amax()
    assert float(per_feature.max()) < 3e-2
    assert _rel(out, expected) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int4_streamed_ops_give_the_same_bits_every_run(rows):
    """The four streamed ops run 20 times on the same inputs give the same bits: the CTA's warps add their
    sums of a block, and their shares of the norm's sum of squares, in a fixed order. (With atomicAdd
    they did not, and an int4 artifact's greedy tokens changed from run to run where two logits nearly
    tie.) N = 17600 (five blocks a CTA), K = 4224 (a last stage of two chunks); one row takes the planes
    form."""
    mma.load_extension()
    n, k, eps = 17600, 4224, 1e-5
    x, packed, pairs, _weight = _case(rows, n, k, 128, torch.bfloat16, "cuda", 90 + rows)
    residual = torch.randn(rows, n, device="cuda").to(torch.bfloat16)
    packed_i, pairs_i = interleave_gate_up(packed, pairs)
    calls = [
        (ops.linear_int4_mma, (x, packed, pairs)),
        (ops.linear_int4_mma_add, (x, packed, pairs, residual)),
        (ops.rms_norm_linear_int4_mma, (x, packed, pairs, eps)),
        (ops.rms_norm_linear_int4_mma_gated_act, (x, packed_i, pairs_i, eps, 0)),
    ]
    for op, args in calls:
        first = op(*args)
        for _ in range(20):
            assert torch.equal(op(*args), first), op


def _check_streamed_ops(rows, n, k, group, seed, eps=1e-5):
    """The three streamed ops on one bf16 case against the float64 oracle, each output row checked on
    its own too (no block of 16 rows left out or summed twice, none missing a group)."""
    x, packed, pairs, weight = _case(rows, n, k, group, torch.bfloat16, "cuda", seed)
    expected = F.linear(x.double(), weight)
    plain = ops.linear_int4_mma(x, packed, pairs)
    assert _rel(plain, expected) < 5e-3
    per_feature = (plain.double() - expected).abs().amax(dim=0) / expected.abs().amax()
    assert float(per_feature.max()) < 2e-2
    normed = ops.rms_norm_linear_int4_mma(x, packed, pairs, eps)
    assert _rel(normed, F.linear(_normed(x, eps), weight)) < 5e-3
    residual = torch.randn(rows, n, device="cuda").to(torch.bfloat16)
    summed = ops.linear_int4_mma_add(x, packed, pairs, residual)
    assert _rel(summed, expected + residual.double()) < 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize(("n", "k"), [(1008, 960), (34000, 2112)])
def test_int4_streamed_kernel_on_one_short_stage_and_many_blocks_a_cta(n, k):
    """The three streamed ops where a block is one stage cut short (K = 960: 15 chunks, not 16) and
    where a CTA sums several blocks (N = 34000: 2125 blocks; nine a CTA at one row, fewer at eight, where
    the warps' sums of nine would not let two CTAs share an SM), at one and eight rows."""
    mma.load_extension()
    for rows in (1, 8):
        _check_streamed_ops(rows, n, k, 64, n + rows)


@pytest.mark.cuda
@pytest.mark.parametrize("group", [32, 128])
def test_int4_streamed_kernel_sums_x_over_more_slices_than_one_batch(group):
    """K = 8320: 65 slices of 128 features, so consumer warp 0 sums x over a ninth slice in a second
    batch of loads (8 warps, 8 slices a batch each), and the block's last stage holds two chunks, both
    warp 0's; at one and three rows, every streamed op."""
    mma.load_extension()
    for rows in (1, 3):
        _check_streamed_ops(rows, 1024, 8320, group, 7 * rows + group)


@pytest.mark.cuda
@pytest.mark.parametrize(("k", "group"), [(12288, 32), (16384, 128)])
def test_int4_streamed_kernel_one_row_where_its_planes_do_not_fit_shared_memory(k, group):
    """One row whose planes (3 bytes a feature, and the group sums) would leave room for one CTA an SM on
    an H100 or H200 (228 KB an SM): x is read from global memory and multiplied in bf16 there instead;
    the same outputs as the oracle's either way."""
    mma.load_extension()
    _check_streamed_ops(1, 512, k, group, k)


def _slices(x: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """x with every 128-feature slice but those in keep set to zero."""
    mask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    for s in keep:
        mask[s * 128 : (s + 1) * 128] = True
    return torch.where(mask, x, torch.zeros_like(x))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_one_row_planes_keep_each_slices_range(dtype, group):
    """One row of x as three int8 planes with a scale a 128-feature slice (K = 2112: 16.5 slices; 2176 in
    groups of 128): slices of magnitudes 10^-3 and 10^3 (10^-15 and 10^15 in bf16) and near fp16's
    largest, one whose largest feature is 4096 times the rest's largest, and the last slice (half of one
    at K = 2112), each alone (the rest of x zero, so that its error is not lost under a larger slice's);
    then the ordinary slices and a slice of zeros together. The plain, add and norm ops against the
    float64 oracle."""
    mma.load_extension()
    n, k, eps = 1008, 2112 if group < 128 else 2176, 1e-5
    x, packed, pairs, weight = _case(1, n, k, group, dtype, "cuda", 90 + group)
    wide = 1e15 if dtype == torch.bfloat16 else 1e3  # its squares' sum (the norm's) still a float
    small = 1e-15 if dtype == torch.bfloat16 else 1e-3
    x = x.float()
    x[:, 128:256] *= small
    x[:, 384:512] *= wide
    x[:, 640:768] = torch.empty(128, device="cuda").uniform_(-60000.0, 60000.0)
    x[:, 768:896] = 0.0
    x[:, 1024 + 37] = 4096 * x[:, 1024:1152].abs().amax()
    x = x.to(dtype)
    for keep in ([1], [3], [5], [8], [16], [0, 2, 4, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16]):
        xs = _slices(x, keep)
        expected = F.linear(xs.double(), weight)
        plain = ops.linear_int4_mma(xs, packed, pairs)
        assert _rel(plain, expected) < 5e-3, keep
        per_feature = (plain.double() - expected).abs().amax(dim=0) / expected.abs().amax()
        assert float(per_feature.max()) < 2e-2, keep
        normed = ops.rms_norm_linear_int4_mma(xs, packed, pairs, eps)
        assert _rel(normed, F.linear(_normed(xs, eps), weight)) < 5e-3, keep
        residual = (expected * 0.5).to(dtype)
        summed = ops.linear_int4_mma_add(xs, packed, pairs, residual)
        assert _rel(summed, expected + residual.double()) < 5e-3, keep


@pytest.mark.cuda
def test_int4_epilogue_ops_refuse_more_than_eight_rows():
    mma.load_extension()
    x, packed, pairs, _ = _case(9, 64, 128, 128, torch.bfloat16, "cuda", 3)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        ops.rms_norm_linear_int4_mma(x, packed, pairs, 1e-5)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        ops.rms_norm_linear_int4_mma_gated_act(x, packed, pairs, 1e-5, 0)
    with pytest.raises(RuntimeError, match="activation must be"):
        ops.rms_norm_linear_int4_mma_gated_act(x[:1], packed, pairs, 1e-5, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [4096, 5120, 4160])
def test_int4_streamed_kernel_one_row_with_two_to_four_blocks_a_cta_slot(k):
    """One row where the blocks are three an SM (llama-8b's fused qkv on an H200: 384 blocks on 132 SMs of
    two CTAs each, a shape a grid may split across CTAs by K): K of 4, 5 (an odd count of stages) and 4.06
    stages (the last one of a single chunk, so groups of 64). The three streamed ops and the gated one
    against the float64 oracle, each output on its own."""
    mma.load_extension()
    n = 16 * 3 * torch.cuda.get_device_properties(0).multi_processor_count
    group = 128 if k % 128 == 0 else 64
    _check_streamed_ops(1, n, k, group, k)
    x, packed, pairs, weight = _case(1, n, k, group, torch.bfloat16, "cuda", k + 1)
    packed_i, pairs_i = interleave_gate_up(packed, pairs)
    expected = _gated(_normed(x, 1e-5), weight, 0)
    out = ops.rms_norm_linear_int4_mma_gated_act(x, packed_i, pairs_i, 1e-5, 0)
    per_feature = (out.double() - expected).abs().amax(dim=0) / expected.abs().amax()
    assert float(per_feature.max()) < 3e-2
    assert _rel(out, expected) < 1e-2
