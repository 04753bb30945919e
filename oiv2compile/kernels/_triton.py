"""Triton, where it is installed (CUDA builds of torch ship it; the CPU build does not).

Kernel files import `triton`, `tl` and `HAS_TRITON` from here so that the CPU path imports cleanly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only torch: the ops run their PyTorch reference
    triton = None
    tl = None
    HAS_TRITON = False


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


__all__ = ["HAS_TRITON", "next_power_of_2", "registering_triton_op", "tl", "triton"]
