"""Triton, where it is installed (CUDA builds of torch ship it; the CPU build does not).

Kernel files import `triton`, `tl` and `HAS_TRITON` from here so that the CPU path imports cleanly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only torch: the ops run their PyTorch reference
    triton = None
    tl = None
    HAS_TRITON = False


def dependents_may_launch_early(device: torch.device) -> bool:
    """Whether a kernel on `device` may let the next kernel start before it ends (programmatic dependent
    launch, sm_90 and later). Our CUDA C++ linears are launched as such dependents: they stream their
    weights at once and wait for the previous grid only before they read its output."""
    return HAS_TRITON and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


if HAS_TRITON:

    @triton.jit
    def launch_dependents(ENABLED: tl.constexpr):
        """griddepcontrol.launch_dependents: a kernel launched programmatically after this one may start
        now (it still waits for this grid to end before it reads what this grid writes). Returns 0, for
        the caller to add to its program id: torch's mutation analysis of Triton kernels skips inline
        asm only where it is marked pure, and a pure result nobody uses would be dropped."""
        zero = 0
        if ENABLED:
            zero = tl.inline_asm_elementwise(
                "griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=True, pack=1
            )
        return zero

else:
    launch_dependents = None


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@contextlib.contextmanager
def registering_triton_op() -> Iterator[None]:
    """Silence torch's warning that a triton_op has no Triton kernels when Triton is absent: on a CPU
    build that is expected, and the op runs its reference."""
    log = logging.getLogger("torch._library.triton")
    level = log.level
    if not HAS_TRITON:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


__all__ = [
    "HAS_TRITON",
    "dependents_may_launch_early",
    "launch_dependents",
    "next_power_of_2",
    "registering_triton_op",
    "tl",
    "triton",
]
