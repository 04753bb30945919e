"""oiv2::prefetched_decode_attention: oiv2::rope_kv_write_attention (a decode step's rotary embedding of
the new token, its key and value written into the caches, its attention over the filled positions) by a
hand-written CUDA C++ kernel (csrc/prefetched_decode_attention.cu) that copies the cached keys and
values into shared memory before the q/k/v product it follows has ended.

Shapes and arguments as oiv2::rope_kv_write_attention: qkv [B, 1, (Hq + 2 Hkv) * D], cos_table and
sin_table [L, D/2] (float32 or qkv's dtype), position_ids [B, 1] or None, caches [N, Hkv, T, D] (written at
cache[slots[b], :, positions[b], :]), slots [B], positions [B] int64, Hq, Hkv, scale; returns
[B, Hq, 1, D] in qkv's dtype. The kernel takes bf16 and fp16 activations, D 64 or 128, at most 8 query
heads a kv head and caches of at most MAX_CACHE positions (`takes`); passes/use_cuda_attention.py puts
it in the decode programs of CUDA artifacts where it takes the shapes.

The schema, the reference (the CPU path: oiv2::rope_kv_write_attention's) and the fake live here; the
CUDA kernel registers itself for the CUDA key when `load_extension()` has compiled and loaded it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oiv2compile.kernels import _cuda_extension
from oiv2compile.kernels.rope_kv_write_attention import rope_kv_write_attention_ref

SOURCE = _cuda_extension.CSRC / "prefetched_decode_attention.cu"
MAX_CACHE = 256  # csrc/prefetched_decode_attention.cu kMaxCache: all of a head's cached rows in shared memory
MAX_GROUP = 8  # query heads a kv head: the tensor-core tile's rows

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define(
    "prefetched_decode_attention(Tensor qkv, Tensor cos_table, Tensor sin_table, Tensor? position_ids, "
    "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor positions, int num_heads, int num_kv_heads, "
    "float scale) -> Tensor"
)


# The spec, and the CPU path: oiv2::rope_kv_write_attention's.
prefetched_decode_attention_ref = rope_kv_write_attention_ref

_lib.impl("prefetched_decode_attention", prefetched_decode_attention_ref, "CPU")


@torch.library.register_fake("oiv2::prefetched_decode_attention")
def _prefetched_decode_attention_fake(
    qkv: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    position_ids: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], num_heads, 1, k_cache.shape[3]))


def takes(qkv: torch.Tensor, cos_table: torch.Tensor, k_cache: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the kernel takes a call with these tensors (real or fake): bf16 or fp16 activations and
    caches, tables in float32 or their dtype, D 64 or 128, at most MAX_GROUP query heads a kv head, a cache of at most
    MAX_CACHE positions, one new token a sequence."""
    T, D = k_cache.shape[2], k_cache.shape[3]
    return (
        qkv.dtype in (torch.bfloat16, torch.float16)
        and k_cache.dtype == qkv.dtype
        and cos_table.dtype in (torch.float32, qkv.dtype)
        and isinstance(T, int)
        and T <= MAX_CACHE
        and D in (64, 128)
        and num_kv_heads > 0
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= MAX_GROUP
        and qkv.dim() == 3
        and isinstance(qkv.shape[1], int)
        and qkv.shape[1] == 1
    )


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel; returns the library."""
    return _cuda_extension.load(SOURCE, build_dir)
