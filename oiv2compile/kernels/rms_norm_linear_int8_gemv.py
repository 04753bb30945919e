"""oiv2::rms_norm_linear_int8_gemv: an RMSNorm of unit weight and the int8 product after it, for 1 to
4 rows, in the kernel of oiv2::linear_int8_gemv (csrc/linear_int8_gemv.cu).

Shapes: x [M, K] (M <= 4) in bf16 or fp16; qweight [N, K] int8 and scales [N] in the layout of
oiv2::linear_int8 ("int8-rowmajor-v1"), quantized from W * diag(g) where g is the norm's weight
(passes/fold_norm_weights.py). Returns [M, N] in x's dtype:
    y[m] = rsqrt(mean(x[m]^2) + eps) * (x[m] @ (qweight * scales)^T)
which is linear(rms_norm(x, g, eps), W) with the norm's scalar per row moved past the product, so the
normalized activations are never rounded or stored. Every warp of the GEMV reads all of x[m] anyway:
the sum of squares costs one FMA a feature there.
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.linear_int8 import row_major, rows_of

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("rms_norm_linear_int8_gemv(Tensor x, Tensor qweight, Tensor scales, float eps) -> Tensor")


def rms_norm_linear_int8_gemv_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, eps: float
) -> torch.Tensor:
    """The spec, and the CPU path: float32 sums of x as it is."""
    h = x.float()
    rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [M, 1]
    return ((h @ row_major(qweight).float().t()) * scales.float() * rms).to(x.dtype)  # [M, N]


_lib.impl("rms_norm_linear_int8_gemv", rms_norm_linear_int8_gemv_ref, "CPU")


@torch.library.register_fake("oiv2::rms_norm_linear_int8_gemv")
def _rms_norm_linear_int8_gemv_fake(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, eps: float
) -> torch.Tensor:
    return x.new_empty((x.shape[0], rows_of(qweight)))
