"""oiv2::linear_int8_gemv_add: y = x @ W^T + residual for 1 to 4 rows, the int8 GEMV of
oiv2::linear_int8_gemv with the residual add after it in its epilogue (csrc/linear_int8_gemv.cu).

Shapes: x [M, K] (M <= 4) in bf16 or fp16; qweight [N, K] int8 and scales [N] in the layout of
oiv2::linear_int8 ("int8-rowmajor-v1"); residual [M, N] in x's dtype. Returns [M, N]: the product
rounded to x's dtype, then the sum rounded again, as the model's linear and residual add round them.
The product that ends an attention or MLP block (o, down) writes the new residual stream this way,
so the norm after it can run inside the next product (oiv2::rms_norm_linear_int8_gemv;
passes/fuse_norm_into_gemv.py).
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.linear_int8 import rows_of
from oiv2compile.kernels.linear_int8_gemv import linear_int8_gemv_ref

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("linear_int8_gemv_add(Tensor x, Tensor qweight, Tensor scales, Tensor residual) -> Tensor")


def linear_int8_gemv_add_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """The spec, and the CPU path."""
    return linear_int8_gemv_ref(x, qweight, scales) + residual  # [M, N]


_lib.impl("linear_int8_gemv_add", linear_int8_gemv_add_ref, "CPU")


@torch.library.register_fake("oiv2::linear_int8_gemv_add")
def _linear_int8_gemv_add_fake(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    return x.new_empty((x.shape[0], rows_of(qweight)))
