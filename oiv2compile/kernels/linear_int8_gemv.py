"""oiv2::linear_int8_gemv: y = x @ W^T for 1 to 4 rows of x with W in the int8 layout of
oiv2::linear_int8 ("int8-rowmajor-v1"), by a hand-written CUDA C++ kernel (csrc/linear_int8_gemv.cu).

The matrix-vector product of a decode step: each warp streams one weight row with 128-bit
non-allocating loads and converts bytes to float without the I2F unit. The schema, the reference (the
CPU path) and the fake live here; the CUDA kernel registers itself for the CUDA key when
`load_extension()` has compiled and loaded it (nvcc, about a minute the first time, cached after).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from oiv2compile.kernels.linear_int8 import linear_int8_ref

SOURCE = Path(__file__).parent / "csrc" / "linear_int8_gemv.cu"
MAX_ROWS = 4

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("linear_int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor")


def linear_int8_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The spec: x [M, K] (M <= 4), qweight [N, K] int8, scales [N] → [M, N] in x's dtype."""
    return linear_int8_ref(x, qweight, scales)


_lib.impl("linear_int8_gemv", linear_int8_gemv_ref, "CPU")


@torch.library.register_fake("oiv2::linear_int8_gemv")
def _linear_int8_gemv_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


def extension_name() -> str:
    """A name that changes with the source and the torch build, so a stale library is never reused."""
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return f"oiv2_linear_int8_gemv_{digest}"


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel; returns the library."""
    from torch.utils import cpp_extension

    name = extension_name()
    build_dir = build_dir or Path(os.environ.get("OIV2_EXTENSIONS_DIR", Path.home() / ".cache" / "oiv2compile" / "ext"))
    target = build_dir / name
    target.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cuda_cflags=["-O3", "--use_fast_math"],
        build_directory=str(target),
        is_python_module=False,
        verbose=False,
    )
    return target / f"{name}.so"
