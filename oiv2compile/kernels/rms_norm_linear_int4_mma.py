"""oiv2::rms_norm_linear_int4_mma: an RMSNorm of unit weight and the int4 product after it, for 1 to 8
rows, in the streamed kernel of oiv2::linear_int4_mma (csrc/linear_int4_mma.cu).

Shapes: x [..., K] (1 to 8 rows in all) in bf16 or fp16; packed and scale_zero in the layout of
oiv2::linear_int4_mma ("int4-mma16x64-v1"), quantized from W * diag(g) where g is the norm's weight
(passes/fold_norm_weights.py). Returns [..., N] in x's dtype:
    y[m] = rsqrt(mean(x[m]^2) + eps) * (x[m] @ W_q^T)
which is linear(rms_norm(x, g, eps), W) with the norm's scalar per row moved past the product, so the
normalized activations are never rounded or stored. In the kernel the consumer warps sum the squares
of x while the first weights are on their way, and the scalar multiplies the sums as they are written.
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.linear_int4_mma import dequantize

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("rms_norm_linear_int4_mma(Tensor x, Tensor packed, Tensor scale_zero, float eps) -> Tensor")


def rms_norm_linear_int4_mma_ref(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, eps: float
) -> torch.Tensor:
    """The spec, and the CPU path: float32 sums of x as it is, the weight as oiv2::linear_int4_mma's
    reference forms it (rounded to x's dtype)."""
    h = x.float()
    rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    weight = dequantize(packed, scale_zero.to(x.dtype)).float()
    return ((h @ weight.t()) * rms).to(x.dtype)


_lib.impl("rms_norm_linear_int4_mma", rms_norm_linear_int4_mma_ref, "CPU")


@torch.library.register_fake("oiv2::rms_norm_linear_int4_mma")
def _rms_norm_linear_int4_mma_fake(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, eps: float
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
