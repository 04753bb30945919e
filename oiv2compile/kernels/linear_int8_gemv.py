"""oiv2::linear_int8_gemv: y = x @ W^T for 1 to 4 rows of x with W in an int8 layout of
oiv2::linear_int8 ("int8-rowmajor-v1" [N, K], or "int8-tiles16x1024-v2" [N/16, 16, K] and its paired form
[N/16, 2, 8, K], which passes/tile_int8_weights.py makes for CUDA builds), by a hand-written CUDA C++ kernel
(csrc/linear_int8_gemv.cu).

The matrix-vector product of a decode step. One row of x (K a multiple of 64) takes a streamed kernel:
a producer warp copies blocks of 16 weight rows into shared memory with the bulk-copy engine (a stage of
the tiles in one copy, of row-major weights in 16), and
consumer warps multiply them on the integer tensor cores against x held as three int8 planes
(csrc/streamed.cuh, shared with the int4 kernel). 2 to 4 rows take a register-streaming kernel: each
warp streams two weight rows with 128-bit non-allocating loads, converts bytes to float without the I2F
unit and x to float once for both rows.
The schema, the reference (the CPU path) and the fake live here; the CUDA kernel registers itself for
the CUDA key when `load_extension()` has compiled and loaded it (`_cuda_extension`), together with the
kernels of oiv2::linear_int8_gemv_add, oiv2::rms_norm_linear_int8_gemv and
oiv2::rms_norm_linear_int8_gemv_gated_act, which share its source. use_cuda_kernels puts it in the
batch-1 decode program of CUDA artifacts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oiv2compile.kernels import _cuda_extension
from oiv2compile.kernels.linear_int8 import linear_int8_ref, rows_of

SOURCE = _cuda_extension.CSRC / "linear_int8_gemv.cu"
MAX_ROWS = 4

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("linear_int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor")


def linear_int8_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The spec: x [M, K] (M <= 4), qweight [N, K] int8, scales [N] → [M, N] in x's dtype."""
    return linear_int8_ref(x, qweight, scales)


_lib.impl("linear_int8_gemv", linear_int8_gemv_ref, "CPU")


@torch.library.register_fake("oiv2::linear_int8_gemv")
def _linear_int8_gemv_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], rows_of(qweight)))


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel; returns the library."""
    return _cuda_extension.load(SOURCE, build_dir)
