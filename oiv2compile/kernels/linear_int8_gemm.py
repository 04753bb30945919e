"""oiv2::linear_int8_gemm: y = x @ W^T for x [..., K] in bf16 or fp16 with W in the int8 layout of
oiv2::linear_int8 ("int8-rowmajor-v1"), by a hand-written CUDA C++ kernel (csrc/linear_int8_gemm.cu):
the product of a prefill, whose row count is only known when it runs.

Up to 256 rows on Hopper: a mixed-input GEMM on the warpgroup tensor cores (wgmma, csrc/wgmma_gemm.cuh),
the weights turned into x's dtype in registers and read once per 128 rows of x, the scale applied to
the float sums. More rows, or another card: slices of W dequantized (as the reference rounds them) and
multiplied by cuBLAS. On the CPU the op is its reference. The weights are the tensors of
oiv2::linear_int8, unchanged: a program that takes this op shares them with the decode programs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oiv2compile.kernels import _cuda_extension
from oiv2compile.kernels.linear_int8 import linear_int8_ref, rows_of

SOURCE = _cuda_extension.CSRC / "linear_int8_gemm.cu"

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("linear_int8_gemm(Tensor x, Tensor qweight, Tensor scales) -> Tensor")


def linear_int8_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The spec: x [..., K], qweight [N, K] int8, scales [N] → [..., N] in x's dtype."""
    return linear_int8_ref(x, qweight, scales)


_lib.impl("linear_int8_gemm", linear_int8_gemm_ref, "CPU")


@torch.library.register_fake("oiv2::linear_int8_gemm")
def _linear_int8_gemm_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], rows_of(qweight)))


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel; returns the library."""
    return _cuda_extension.load(SOURCE, build_dir)
