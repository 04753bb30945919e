"""oiv2::rms_norm_linear_int4_mma_gated_act: an RMSNorm of unit weight, the fused gate/up int4 product
after it and the gated activation after that, for 1 to 8 rows, in the streamed kernel of
oiv2::linear_int4_mma (csrc/linear_int4_mma.cu).

Shapes: x [..., K] (1 to 8 rows in all) in bf16 or fp16; packed [2I, K/2] and scale_zero in the layout
of oiv2::linear_int4_mma ("int4-mma16x64-v1"), the gate projection's rows first and the up
projection's after them (fuse_ffn's order; I a multiple of 16), quantized from W * diag(g)
(passes/fold_norm_weights.py); activation the index of one of oiv2::gated_act's ACTIVATIONS (0 silu,
1 gelu, 2 gelu_tanh). Returns [..., I] in x's dtype:
    y = gated_act(rms_norm_linear_int4_mma(x, packed, scale_zero, eps), ACTIVATIONS[activation])
with the same roundings: gate and up to x's dtype, the activation, then the product. In the kernel a
thread block streams the gate blocks of its outputs and then their up blocks, and combines the two in
shared memory: the [M, 2I] product is never written and read again, and the activation kernel goes.
The weights keep the layout every other program of the artifact reads.
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.gated_act import ACTIVATIONS, gated_act_ref
from oiv2compile.kernels.rms_norm_linear_int4_mma import rms_norm_linear_int4_mma_ref

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define(
    "rms_norm_linear_int4_mma_gated_act(Tensor x, Tensor packed, Tensor scale_zero, float eps, int activation)"
    " -> Tensor"
)


def rms_norm_linear_int4_mma_gated_act_ref(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, eps: float, activation: int
) -> torch.Tensor:
    """The spec, and the CPU path."""
    product = rms_norm_linear_int4_mma_ref(x, packed, scale_zero, eps)  # [..., 2I]
    return gated_act_ref(product, ACTIVATIONS[activation])  # [..., I]


_lib.impl("rms_norm_linear_int4_mma_gated_act", rms_norm_linear_int4_mma_gated_act_ref, "CPU")


@torch.library.register_fake("oiv2::rms_norm_linear_int4_mma_gated_act")
def _rms_norm_linear_int4_mma_gated_act_fake(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, eps: float, activation: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0] // 2))
