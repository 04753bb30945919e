"""oiv2::decode_attention: oiv2::attention for one new token per sequence over a cache of at most
MAX_CACHE positions, by a hand-written CUDA C++ kernel (csrc/decode_attention.cu).

Shapes and meaning as oiv2::attention at S = 1: q [B, Hq, 1, D], k_cache and v_cache [N, Hkv, T, D]
(contiguous), slots [B] and positions [B] int64; query head h of sequence b attends to the cache
positions 0 .. positions[b] of row slots[b], kv head h // (Hq // Hkv). Returns [B, Hq, 1, D] in q's
dtype (bf16 or fp16), softmax in float32.

Why: one launch of a cluster of 8 CTAs per (sequence, kv head), each taking an eighth of the filled
positions and combining through distributed shared memory, where the Triton single pass walks the
positions of a kv head in one program and the split path needs a second kernel (see the source for
the figures). use_cuda_attention puts it in the decode programs of CUDA artifacts. The schema, the
reference (the CPU path, oiv2::attention's) and the fake live here; the CUDA kernel registers itself for
the CUDA key when `load_extension()` has compiled and loaded it (`_cuda_extension`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from oiv2compile.kernels import _cuda_extension
from oiv2compile.kernels.attention import attention_ref

SOURCE = _cuda_extension.CSRC / "decode_attention.cu"
MAX_CACHE = 8 * 128  # a cluster of 8 CTAs, at most 128 positions each
MAX_GROUP = 8  # query heads per kv head
HEAD_SIZES = (64, 128)

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions, float scale) -> Tensor"
)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The spec: oiv2::attention's reference at S = 1."""
    return attention_ref(q, k_cache, v_cache, slots, positions, scale)


_lib.impl("decode_attention", decode_attention_ref, "CPU")


@torch.library.register_fake("oiv2::decode_attention")
def _decode_attention_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], 1, q.shape[3]))


def takes(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel serves attention of this query (fixed sizes) over this cache."""
    if not all(isinstance(s, int) for s in (*q.shape, *k_cache.shape)):
        return False
    _B, Hq, S, D = q.shape
    _N, Hkv, T, Dk = k_cache.shape
    return (
        S == 1
        and q.dtype in (torch.bfloat16, torch.float16)
        and k_cache.dtype == q.dtype
        and D == Dk
        and D in HEAD_SIZES
        and Hkv > 0
        and Hq % Hkv == 0
        and Hq // Hkv <= MAX_GROUP
        and T <= MAX_CACHE
    )


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel; returns the library."""
    return _cuda_extension.load(SOURCE, build_dir)
