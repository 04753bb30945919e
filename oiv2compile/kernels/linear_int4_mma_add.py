"""oiv2::linear_int4_mma_add: y = x @ W^T + residual for 1 to 8 rows, the int4 product of
oiv2::linear_int4_mma with the residual add in its epilogue (csrc/linear_int4_mma.cu, the streamed
kernel).

Shapes: x [..., K] (1 to 8 rows in all) in bf16 or fp16; packed and scale_zero in the layout of
oiv2::linear_int4_mma ("int4-mma16x64-v1"); residual of the product's shape [..., N] in x's dtype.
Returns [..., N]: the product rounded to x's dtype, then the sum rounded again, as the model's linear
and residual add round them. The product that ends an attention or MLP block (o, down) writes the new
residual stream this way, so that the norm after it can run inside the next product
(oiv2::rms_norm_linear_int4_mma; passes/fuse_norm_into_gemv.py).
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.linear_int4_mma import linear_int4_mma_ref

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("linear_int4_mma_add(Tensor x, Tensor packed, Tensor scale_zero, Tensor residual) -> Tensor")


def linear_int4_mma_add_ref(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """The spec, and the CPU path."""
    return linear_int4_mma_ref(x, packed, scale_zero) + residual


_lib.impl("linear_int4_mma_add", linear_int4_mma_add_ref, "CPU")


@torch.library.register_fake("oiv2::linear_int4_mma_add")
def _linear_int4_mma_add_fake(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
