"""oiv2::rms_norm_linear_int8_gemv_gated_act: an RMSNorm of unit weight, the fused gate/up int8
product after it and the gated activation after that, for 1 to 4 rows, in the kernel of
oiv2::linear_int8_gemv (csrc/linear_int8_gemv.cu).

Shapes: x [M, K] (M <= 4) in bf16 or fp16; qweight [2I, K] int8 and scales [2I] in the layout of
oiv2::linear_int8 ("int8-rowmajor-v1"), the gate projection's rows first and the up projection's after
them (fuse_ffn's order), quantized from W * diag(g) (passes/fold_norm_weights.py); activation the
index of one of oiv2::gated_act's in ACTIVATIONS (0 silu, 1 gelu, 2 gelu_tanh: an int, which every
caller of a compiled artifact passes as it is). Returns [M, I] in x's dtype:
    y = gated_act(rms_norm_linear_int8_gemv(x, qweight, scales, eps), ACTIVATIONS[activation])
with the same roundings: gate and up to x's dtype, the activation, then the product. In the kernel one
thread block computes gate and up rows of the same outputs and combines them in shared memory, so the
[M, 2I] product is never written and read again, and the activation kernel and its launch go.
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.gated_act import ACTIVATIONS, gated_act_ref
from oiv2compile.kernels.linear_int8 import rows_of
from oiv2compile.kernels.rms_norm_linear_int8_gemv import rms_norm_linear_int8_gemv_ref

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define(
    "rms_norm_linear_int8_gemv_gated_act(Tensor x, Tensor qweight, Tensor scales, float eps, int activation) -> Tensor"
)


def rms_norm_linear_int8_gemv_gated_act_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, eps: float, activation: int
) -> torch.Tensor:
    """The spec, and the CPU path."""
    product = rms_norm_linear_int8_gemv_ref(x, qweight, scales, eps)  # [M, 2I]
    return gated_act_ref(product, ACTIVATIONS[activation])  # [M, I]


_lib.impl("rms_norm_linear_int8_gemv_gated_act", rms_norm_linear_int8_gemv_gated_act_ref, "CPU")


@torch.library.register_fake("oiv2::rms_norm_linear_int8_gemv_gated_act")
def _rms_norm_linear_int8_gemv_gated_act_fake(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, eps: float, activation: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], rows_of(qweight) // 2))
