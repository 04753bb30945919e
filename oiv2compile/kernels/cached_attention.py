"""oiv2::cached_attention: the functional form of one layer's two oiv2::kv_write ops and its
oiv2::attention, over a cache whose row b belongs to sequence b. It is what ONNX Runtime's
GroupQueryAttention computes, and exists for the ONNX backend only (backends/onnx.py), which
rewrites the in-place ops into it before exporting: an exported graph cannot mutate its inputs, so
the written caches become outputs, which the executor binds to the input buffers.

Shapes: q [B, Hq, S, D], k and v [B, Hkv, S, D] (the new tokens' keys and values), k_cache and
v_cache [B, Hkv, T, D], positions [B] int64 (absolute position of each sequence's first new token).
Returns (out [B, Hq, S, D], k_cache with the new keys at positions[b] .. positions[b] + S - 1 of
row b, v_cache likewise). `num_heads` and `kv_heads` repeat Hq and Hkv so that a translation can
read them as attributes.
"""

from __future__ import annotations

import torch

from oiv2compile.kernels.attention import attention_ref
from oiv2compile.kernels.kv_write import kv_write_ref


def cached_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    num_heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec: write the new keys and values into copies of the caches, then attend."""
    rows = torch.arange(q.shape[0], device=q.device)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    kv_write_ref(k_cache, k, rows, positions)
    kv_write_ref(v_cache, v, rows, positions)
    return attention_ref(q, k_cache, v_cache, rows, positions, scale), k_cache, v_cache


@torch.library.custom_op("oiv2::cached_attention", mutates_args=())
def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    num_heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cached_attention_ref(q, k, v, k_cache, v_cache, positions, scale, num_heads, kv_heads)


@cached_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    num_heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)
