"""oiv2::rms_norm_linear_int4_mma_gated_act: an RMSNorm of unit weight, the fused gate/up int4 product
after it and the gated activation after that, for 1 to 8 rows, in the streamed kernel of
oiv2::linear_int4_mma (csrc/linear_int4_mma.cu).

Shapes: x [..., K] (1 to 8 rows in all) in bf16 or fp16; packed [2I, K/2] and scale_zero in the layout of
oiv2::linear_int4_mma ("int4-mma16x64-v1"), quantized from W * diag(g) (passes/fold_norm_weights.py),
the rows of the fused gate/up weight interleaved by 8 (`interleave_gate_up`): block j of 16 rows holds
gate rows 8j..8j+7, then up rows 8j..8j+7. activation: the index of one of oiv2::gated_act's
ACTIVATIONS. Returns [..., I] in x's dtype:
    y = gated_act(deinterleave(rms_norm_linear_int4_mma(x, packed, scale_zero, eps)), ACTIVATIONS[activation])
with the same roundings: gate and up to x's dtype, the activation, then the product. The interleave puts
the gate and up rows of an output in the same mma tile, so one lane holds both sums and every CTA keeps
its split of the blocks (no pairs of blocks to hand out); the [M, 2I] product is never written.
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.gated_act import ACTIVATIONS, gated_act_ref
from oiv2compile.kernels.linear_int4_mma import BLOCK_ROWS, pack, split_scale_zero, unpack
from oiv2compile.kernels.linear_int4_mma import scale_zero as pairs_of
from oiv2compile.kernels.rms_norm_linear_int4_mma import rms_norm_linear_int4_mma_ref

HALF = BLOCK_ROWS // 2  # gate rows (and up rows) of one block
INTERLEAVED = "interleaved by 8"  # a product's record (gate_up_rows) where it reads such a weight

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define(
    "rms_norm_linear_int4_mma_gated_act(Tensor x, Tensor packed, Tensor scale_zero, float eps, int activation) -> Tensor"
)


def interleaved_rows(width: int) -> torch.Tensor:
    """The rows of a fused gate/up weight [2I, K] (gate rows, then up rows) in interleaved order: entry i
    is the fused row that becomes row i."""
    if width % HALF:
        raise ValueError(f"the interleaved gate/up layout needs I a multiple of {HALF}, not {width}")
    j = torch.arange(width // HALF).repeat_interleave(HALF)  # block of each output
    r = torch.arange(width) % HALF
    gate = j * HALF + r
    return torch.stack((gate.view(-1, HALF), (gate + width).view(-1, HALF)), dim=1).reshape(-1)


def interleave_gate_up(packed: torch.Tensor, scale_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused gate/up weight in int4-mma16x64-v1 (gate rows, then up rows) → the same weight with its
    rows interleaved by 8, in the same layout: the operands of oiv2::rms_norm_linear_int4_mma_gated_act."""
    order = interleaved_rows(packed.shape[0] // 2).to(packed.device)
    scales, zeros = split_scale_zero(scale_zero)
    return pack(unpack(packed)[order]), pairs_of(scales[order], zeros[order])


def deinterleave(y: torch.Tensor) -> torch.Tensor:
    """[..., 2I] in interleaved order → [..., 2I] with the gate columns first, then the up columns."""
    blocks = y.reshape(*y.shape[:-1], -1, 2, HALF)  # [..., I/8, gate|up, 8]
    return blocks.transpose(-3, -2).reshape(y.shape)


def rms_norm_linear_int4_mma_gated_act_ref(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, eps: float, activation: int
) -> torch.Tensor:
    """The spec, and the CPU path."""
    product = rms_norm_linear_int4_mma_ref(x, packed, scale_zero, eps)  # [..., 2I], interleaved
    return gated_act_ref(deinterleave(product), ACTIVATIONS[activation])  # [..., I]


_lib.impl("rms_norm_linear_int4_mma_gated_act", rms_norm_linear_int4_mma_gated_act_ref, "CPU")


@torch.library.register_fake("oiv2::rms_norm_linear_int4_mma_gated_act")
def _rms_norm_linear_int4_mma_gated_act_fake(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, eps: float, activation: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0] // 2))
