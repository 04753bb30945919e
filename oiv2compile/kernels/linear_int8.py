"""oiv2::linear_int8: y = x @ W^T (+ bias) with W stored as int8, one scale per output channel.

Layout ("int8-rowmajor-v1"): qweight [N, K] int8, row n holding output channel n, values in
[-127, 127]; scales [N] in the activation dtype; W[n, k] = qweight[n, k] * scales[n] (symmetric, no
zero point). `quantize` makes the layout from a float weight by rounding to nearest.

On the CPU, and for prefill-sized inputs on CUDA, the op's body is its reference (the spec), which
Inductor inlines: one fused pass that dequantizes the weight, then one matrix product.
For decode-sized inputs on CUDA it is the Triton kernel of `_quant_matmul`, which streams the int8
weights once and converts them in registers. CUDA builds through Inductor replace the op with the C++
ops on the same tensors where they apply (passes/use_cuda_kernels.py): oiv2::linear_int8_gemv for one
row, oiv2::linear_int8_gemm for prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op

from oiv2compile.kernels._quant_matmul import quant_matmul, takes
from oiv2compile.kernels._triton import HAS_TRITON, registering_triton_op

LAYOUT = "int8-rowmajor-v1"
QMAX = 127


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight [N, K] int8, scales [N] in `dtype`) of a float weight [N, K], round to nearest.

    The scale is rounded to `dtype` before the weights are divided by it, so that dequantizing with
    the stored scale gives back what was rounded."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scales


def dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] (in the scales' dtype) that the layout stands for."""
    return (qweight.float() * scales.float()[:, None]).to(scales.dtype)


def linear_int8_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The spec, the CPU path and the prefill path: dequantize (one fused pass), then one matrix
    product. Scaling the product's columns instead would be one pass less, but Inductor rewrites
    that form (convert, mm, multiply by the scales, in bf16) to aten._weight_int8pack_mm, whose
    AOTInductor CPU program crashed (torch 2.13, 2026-11-27) and whose CUDA kernel is slower than bf16
    (ANCHORS.md)."""
    y = F.linear(x, dequantize(qweight, scales.to(x.dtype)))
    return y + bias if bias is not None else y


with registering_triton_op():

    @triton_op("oiv2::linear_int8", mutates_args=())
    def linear_int8(
        x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if HAS_TRITON and x.device.type == "cuda" and takes(x, 8, 0):
            y = quant_matmul(x, qweight, scales, None, bits=8, group=0)
            return y + bias if bias is not None else y
        return linear_int8_ref(x, qweight, scales, bias)
