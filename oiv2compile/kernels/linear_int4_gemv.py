"""oiv2::linear_int4_gemv: y = x @ W^T for 1 to 4 rows of x with W in the 4-bit layout of
oiv2::linear_int4 ("int4-grouphalves-v2", groups of 32, 64 or 128), by a hand-written CUDA C++ kernel
(csrc/linear_int4_gemv.cu).

The matrix-vector product of a decode step: each warp streams one weight row with 128-bit
non-allocating loads (32 weights a lane), turns nibbles into floats without the I2F unit and applies
each group's scale once to a lane's partial sum. The schema, the reference (the CPU path) and the fake
live here; the CUDA kernel registers itself for the CUDA key when `load_extension()` has compiled and
loaded it (`_cuda_extension`). Artifacts do not call it yet: it is a candidate for the one-row int4
products, where the Triton kernel of `_quant_matmul` stays below bf16 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from oiv2compile.kernels import _cuda_extension
from oiv2compile.kernels.linear_int4 import linear_int4_ref

SOURCE = _cuda_extension.CSRC / "linear_int4_gemv.cu"
MAX_ROWS = 4

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("linear_int4_gemv(Tensor x, Tensor packed, Tensor scales, Tensor zeros) -> Tensor")


def linear_int4_gemv_ref(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """The spec: x [M, K] (M <= 4), packed [N, K/2] uint8, scales and zeros [N, K/G] → [M, N] in x's dtype."""
    return linear_int4_ref(x, packed, scales, zeros)


_lib.impl("linear_int4_gemv", linear_int4_gemv_ref, "CPU")


@torch.library.register_fake("oiv2::linear_int4_gemv")
def _linear_int4_gemv_fake(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel; returns the library."""
    return _cuda_extension.load(SOURCE, build_dir)
