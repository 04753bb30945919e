"""oiv2::add_rms_norm_linear_int8_gemv: a residual add, an RMSNorm whose weight is folded into the int8
weights after it, and their matrix-vector product, in one kernel (csrc/linear_int8_gemv.cu).

Shapes: x and residual [M, K] (M <= 4) in bf16 or fp16; qweight [N, K] int8 and scales [N] in the
layout of oiv2::linear_int8 ("int8-rowmajor-v1"), quantized from W * diag(g) where g is the norm's
weight (passes/fold_norm_weights.py). Returns (y [M, N], hidden [M, K]):
    hidden = x + residual                                    (rounded to x's dtype: the new residual)
    y[m]   = rsqrt(mean(hidden[m]^2) + eps) * (hidden[m] @ (qweight * scales)^T)
which is linear(add_rms_norm(x, residual, g, eps).out, W) with the norm's scalar per row moved past
the product, so the normalized activations are never rounded or stored.

Why one kernel: the int8 GEMV of a decode step reads every feature of its input in every warp, so the
sum of squares costs one FMA a feature there, and the add two loads a feature that L1 serves. That
drops the add + RMSNorm kernel before each qkv and gate/up product (two a layer) and the launch gap
around it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oiv2compile.kernels import _cuda_extension
from oiv2compile.kernels.linear_int8_gemv import SOURCE

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define(
    "add_rms_norm_linear_int8_gemv(Tensor x, Tensor residual, Tensor qweight, Tensor scales, float eps)"
    " -> (Tensor, Tensor)"
)


def add_rms_norm_linear_int8_gemv_ref(
    x: torch.Tensor, residual: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec, and the CPU path: float32 sums of the rounded residual stream."""
    hidden = x + residual  # [M, K]
    h = hidden.float()
    rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [M, 1]
    y = (h @ qweight.float().t()) * scales.float() * rms  # [M, N]
    return y.to(x.dtype), hidden


_lib.impl("add_rms_norm_linear_int8_gemv", add_rms_norm_linear_int8_gemv_ref, "CPU")


@torch.library.register_fake("oiv2::add_rms_norm_linear_int8_gemv")
def _add_rms_norm_linear_int8_gemv_fake(
    x: torch.Tensor, residual: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((x.shape[0], qweight.shape[0])), x.new_empty(x.shape)


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel, which it shares with
    oiv2::linear_int8_gemv; returns the library."""
    return _cuda_extension.load(SOURCE, build_dir)


__all__ = ["add_rms_norm_linear_int8_gemv_ref", "load_extension"]
