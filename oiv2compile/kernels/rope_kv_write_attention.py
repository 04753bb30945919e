"""oiv2::rope_kv_write_attention: a decode step's oiv2::rope_kv_write and the oiv2::attention after
it, in one kernel launch (two where the attention splits a long cache).

Shapes: qkv [B, 1, (Hq + 2 Hkv) * D], one new token per sequence, the fused q/k/v projection's row;
the rest as oiv2::rope_kv_write takes them (cos_table and sin_table [L, D/2], position_ids [B, 1] or
None for the cache positions, caches [N, Hkv, T, D], slots [B], positions [B] int64) and oiv2::attention
(scale). Returns the attention's output [B, Hq, 1, D] in qkv's dtype; writes the rotated k and v of
sequence b to cache[slots[b], :, positions[b], :], as oiv2::rope_kv_write does.

Why: in a decode step the rotary kernel runs between the q/k/v product and the attention, each of
them a kernel that AOTInductor launches after the one before has ended. Here each attention program
rotates its group's q heads and its kv head's key from the row itself (a few hundred bytes), writes
the key and value into the cache, reads the positions before it from the cache, and adds the new
position's key and value from registers after that loop, so no program reads what another is
writing. The program whose positions hold the new token writes it: the only one at a single pass,
the split whose chunk holds it otherwise. Numerics: q and k rotated in float32 and rounded once, as
oiv2::rope_kv_write rounds them, then oiv2::attention's arithmetic.

Measured (H200, llama-8b heads, batch 1, one call replayed from a CUDA graph): 5.13 us against 6.72
for the two ops at 129 filled positions of 256, 6.97 against 7.53 at 251, 10.07 against 10.84 at 3001
of 4096 (split). End to end, llama-8b decode on an H200, each pair built and measured in one call
(benchmarks/RESULTS.md): bf16 237.1 tok/s with it against 232.8 and 234.2 without (fb0c6d5), int8
398.4 against 397.2 and 397.9 (fb0c6d5), int4 601.5 against 585.7 (f044de0); an older int8 pair had it
1.2% slower (386.6 against 391.4, 537801e). So passes/fuse_rope_into_attention.py runs by default.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from oiv2compile.kernels._triton import HAS_TRITON, registering_triton_op
from oiv2compile.kernels.attention import RotaryToken, _attention_triton, attention_ref
from oiv2compile.kernels.rope_kv_write import rope_kv_write_ref


def rope_kv_write_attention_ref(
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
    """The spec, and the CPU path: oiv2::rope_kv_write, then oiv2::attention on its q."""
    q = rope_kv_write_ref(
        qkv, cos_table, sin_table, position_ids, k_cache, v_cache, slots, positions, num_heads, num_kv_heads
    )  # [B, Hq, 1, D]
    return attention_ref(q, k_cache, v_cache, slots, positions, scale)


# See attention.py for why triton_op and why the Triton warning is silenced on CPU.
with registering_triton_op():

    @triton_op("oiv2::rope_kv_write_attention", mutates_args={"k_cache", "v_cache"})
    def rope_kv_write_attention(
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
        if qkv.dim() != 3 or not (isinstance(qkv.shape[1], int) and qkv.shape[1] == 1):
            raise ValueError(f"rope_kv_write_attention takes one new token per sequence, not qkv {tuple(qkv.shape)}")
        if HAS_TRITON and qkv.device.type == "cuda":
            rope = RotaryToken(qkv, cos_table, sin_table, position_ids, num_heads)
            return _attention_triton(None, k_cache, v_cache, slots, positions, scale, rope=rope)
        return rope_kv_write_attention_ref(
            qkv, cos_table, sin_table, position_ids, k_cache, v_cache, slots, positions, num_heads, num_kv_heads, scale
        )
