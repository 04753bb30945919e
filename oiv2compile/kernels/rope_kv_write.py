"""oiv2::rope_kv_write: rotary embedding of q and k, and the cache writes of k and v, from the fused
q/k/v projection's output in one kernel.

Shapes: qkv [B, S, (Hq + 2 Hkv) * D] (the heads of q, then of k, then of v, as fuse_qkv lays them
out); cos_table and sin_table [L, D/2] in qkv's dtype, row p holding the rotary embedding's cos and
sin at position p (Hugging Face's `cos`/`sin` at p are a row repeated for both halves of D);
position_ids [B, S] (the rotary positions, in 0 .. L-1), or None where they are the cache positions
(positions[b] + t, as the executor's programs make them); caches [N, Hkv, T, D], slots [B] and
positions [B] int64. Returns q with the rotary embedding applied, [B, Hq, S, D]; writes k (rotated)
and v of token t of sequence b to cache[slots[b], :, positions[b] + t, :]. Rotation as Hugging
Face's `rotate_half`, with c and s the table rows at the token's position:
    x' = x * cat(c, c) + cat(-x[D/2:], x[:D/2]) * cat(s, s).

Why: the decode step of a Llama-shaped model otherwise runs five small kernels per layer here
(rotary on q, rotary on k, a copy of v's strided view, two cache writes), each reading a few KB and
each paying a launch and a tail: 92 us of a 1.3 ms llama-1b step on an H100, against 23 us for this
kernel (benchmarks/RESULTS.md). position_ids None: given the [B, S] ids that the graph computes
once (positions + arange), Inductor recomputed them in a small kernel before every layer's call.
Tables rather than cos/sin tensors: given [B, S, D] cos and sin
computed in the graph, Inductor recomputed them for every layer inside the o-projection's kernel,
which took the saving back (the step went from 1174 to 1146 us of kernels with the tables, H100).
Bytes: the qkv row and one table row per token are read once, q, k and v
written once.

The CUDA kernel computes in float32 and rounds once; the reference computes in qkv's dtype as
Hugging Face does (two products and a sum, each rounded), so the two agree within a unit in the last
place in bf16/fp16 and exactly in float32 up to the order of the two roundings. Writes past T are
dropped by the CUDA kernel (as oiv2::kv_write's); the reference raises an index error there instead.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from oiv2compile.kernels._triton import HAS_TRITON, next_power_of_2, registering_triton_op, tl, triton
from oiv2compile.kernels.kv_write import kv_write_ref

# Heads (of q, k and v together) per program: llama-1b's 48 make 6 programs a token.
BLOCK_H = 8


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding of x [B, H, S, D] with cos, sin [B, S, D], in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def split_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """qkv [B, S, (Hq + 2 Hkv) * D] → q [B, Hq, S, D], k and v [B, Hkv, S, D] (views)."""
    B, S, width = qkv.shape
    D = width // (num_heads + 2 * num_kv_heads)
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    return tuple(t.view(B, S, -1, D).transpose(1, 2) for t in (q, k, v))


def rotary_tables(
    inv_freq: torch.Tensor, length: int, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_table, sin_table) [length, D/2] in `dtype`: Hugging Face's rotary cos and sin at positions
    0 .. length-1 as its rotary embedding computes them (float32 angles position * inv_freq, cos and
    sin in float32 times the attention scaling, then rounded to the model's dtype)."""
    angles = torch.arange(length, device=inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def table_rows(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """cos or sin [B, S, D] as Hugging Face computes them, from a table [L, D/2] and positions [B, S]."""
    rows = table[position_ids]  # [B, S, D/2]
    return torch.cat((rows, rows), dim=-1)


def rotary_positions(position_ids: torch.Tensor | None, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The rotary positions [B, S]: position_ids, or the cache positions positions[b] + t."""
    if position_ids is not None:
        return position_ids
    return positions[:, None] + torch.arange(seq_len, device=positions.device)[None, :]


def rope_kv_write_ref(
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
) -> torch.Tensor:
    """The spec, and the CPU path: Hugging Face's rotary embedding, then two oiv2::kv_write."""
    q, k, v = split_heads(qkv, num_heads, num_kv_heads)
    ids = rotary_positions(position_ids, positions, qkv.shape[1])
    cos, sin = table_rows(cos_table, ids), table_rows(sin_table, ids)
    kv_write_ref(k_cache, rotate(k, cos, sin), slots, positions)
    kv_write_ref(v_cache, v, slots, positions)
    return rotate(q, cos, sin).contiguous()


if HAS_TRITON:

    @triton.jit
    def _rope_kv_write_kernel(
        QKV,
        CosTable,
        SinTable,
        PositionIds,
        KCache,
        VCache,
        Slots,
        Positions,
        Out,
        stride_xb,
        stride_xs,
        stride_pb,
        stride_ps,
        stride_kn,
        stride_kh,
        stride_kt,
        stride_vn,
        stride_vh,
        stride_vt,
        stride_ob,
        stride_oh,
        stride_os,
        S,
        T,
        TABLE_LEN,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        CACHE_POSITIONS: tl.constexpr,
    ):
        # Program (token, head block): heads h of the row [q heads | k heads | v heads], both halves
        # of each head's D features.
        token = tl.program_id(0)
        b = token // S
        s = token % S
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        d = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
        d_ok = d < HALF
        is_q = h < NUM_HEADS
        is_k = (h >= NUM_HEADS) & (h < NUM_HEADS + NUM_KV_HEADS)
        is_v = (h >= NUM_HEADS + NUM_KV_HEADS) & (h < NUM_HEADS + 2 * NUM_KV_HEADS)
        row = QKV + b.to(tl.int64) * stride_xb + s * stride_xs + h[:, None] * (2 * HALF) + d[None, :]
        valid = (is_q | is_k | is_v)[:, None] & d_ok[None, :]
        x1 = tl.load(row, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
        x2 = tl.load(row + HALF, mask=valid, other=0.0).to(tl.float32)
        # Both halves of a head turn by the same angles: one table row serves both.
        pos = tl.load(Positions + b) + s
        if CACHE_POSITIONS:  # the rotary positions are the cache positions
            rotary_pos = pos
        else:
            rotary_pos = tl.load(PositionIds + b.to(tl.int64) * stride_pb + s * stride_ps)
        rotary_pos = tl.minimum(tl.maximum(rotary_pos, 0), TABLE_LEN - 1).to(tl.int64)
        c = tl.load(CosTable + rotary_pos * HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        sn = tl.load(SinTable + rotary_pos * HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        r1 = x1 * c - x2 * sn
        r2 = x2 * c + x1 * sn

        q_head = tl.where(is_q, h, 0)
        q_dst = Out + b.to(tl.int64) * stride_ob + q_head[:, None] * stride_oh + s * stride_os + d[None, :]
        q_mask = is_q[:, None] & d_ok[None, :]
        tl.store(q_dst, r1.to(Out.dtype.element_ty), mask=q_mask)
        tl.store(q_dst + HALF, r2.to(Out.dtype.element_ty), mask=q_mask)

        slot = tl.load(Slots + b).to(tl.int64)
        in_cache = pos < T
        k_head = tl.where(is_k, h - NUM_HEADS, 0)
        k_dst = KCache + slot * stride_kn + k_head[:, None] * stride_kh + pos * stride_kt + d[None, :]
        k_mask = (is_k & in_cache)[:, None] & d_ok[None, :]
        tl.store(k_dst, r1.to(KCache.dtype.element_ty), mask=k_mask)
        tl.store(k_dst + HALF, r2.to(KCache.dtype.element_ty), mask=k_mask)
        v_head = tl.where(is_v, h - NUM_HEADS - NUM_KV_HEADS, 0)
        v_dst = VCache + slot * stride_vn + v_head[:, None] * stride_vh + pos * stride_vt + d[None, :]
        v_mask = (is_v & in_cache)[:, None] & d_ok[None, :]
        tl.store(v_dst, x1.to(VCache.dtype.element_ty), mask=v_mask)
        tl.store(v_dst + HALF, x2.to(VCache.dtype.element_ty), mask=v_mask)


def _rope_kv_write_triton(
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
) -> torch.Tensor:
    B, S, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    D = width // heads
    out = torch.empty((B, num_heads, S, D), dtype=qkv.dtype, device=qkv.device)  # [B, Hq, S, D]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos_table, sin_table = cos_table.contiguous(), sin_table.contiguous()  # [L, D/2], tables made contiguous
    cache_positions = position_ids is None
    ids = positions[:, None] if position_ids is None else position_ids  # [B, S]; not read when cache_positions
    wrap_triton(_rope_kv_write_kernel)[(B * S, triton.cdiv(heads, BLOCK_H))](
        qkv,
        cos_table,
        sin_table,
        ids,
        k_cache,
        v_cache,
        slots,
        positions,
        out,
        qkv.stride(0),
        qkv.stride(1),
        ids.stride(0),
        ids.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        S,
        k_cache.shape[2],
        cos_table.shape[0],
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=D // 2,
        BLOCK_HALF=next_power_of_2(D // 2),
        BLOCK_H=BLOCK_H,
        CACHE_POSITIONS=cache_positions,
        num_warps=2 if D <= 128 else 4,
    )
    return out


# See attention.py for why triton_op and why the Triton warning is silenced on CPU.
with registering_triton_op():

    @triton_op("oiv2::rope_kv_write", mutates_args={"k_cache", "v_cache"})
    def rope_kv_write(
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
    ) -> torch.Tensor:
        if HAS_TRITON and qkv.device.type == "cuda":
            return _rope_kv_write_triton(
                qkv, cos_table, sin_table, position_ids, k_cache, v_cache, slots, positions, num_heads, num_kv_heads
            )
        return rope_kv_write_ref(
            qkv, cos_table, sin_table, position_ids, k_cache, v_cache, slots, positions, num_heads, num_kv_heads
        )
