"""oiv2::attention: causal attention of new query tokens over each sequence's filled cache positions.

Shapes: q [B, Hq, S, D] holds S new tokens of each of B sequences; k_cache and v_cache are
[N, Hkv, T, D] (N cache rows, T = max_seq_len). Sequence b lives in cache row slots[b] and its first
new token sits at absolute position positions[b]. Query token t of sequence b attends to the cache
positions 0 .. positions[b] + t, so the cache must already hold the new tokens (oiv2::kv_write runs
first). Grouped-query attention: query head h reads kv head h // (Hq // Hkv). Returns [B, Hq, S, D]
in q's dtype; softmax is computed in float32.

Prefill (S > 1) and decode (S = 1) are the same op. On CUDA one Triton program handles one
(sequence, kv head) pair and a block of its query rows (the group's heads times the new tokens), so
each K/V byte of the filled part is read once per block and nothing past positions[b] + S is read.

Decode (flash-decoding). At S = 1 that grid is B * Hkv programs: 8 at batch 1 of an 8-kv-head model,
on a GPU of 132 SMs, each walking thousands of positions alone. A decode call therefore splits every
sequence's positions into chunks of DECODE_CHUNK: grid (splits, B * Hkv), splits = ceil(T / chunk).
Each program reads its chunk of K and V once for all the group's query heads and writes float32
partials (running max m, sum l, un-normalized output acc); a second kernel combines a head's
partials by log-sum-exp rescaling. A chunk that starts at or past the filled length loads nothing
and writes m = -inf, l = 0, and the combine reads only the chunks below the filled length, so the
time follows the filled length, not T. Bytes per (sequence, kv head): the K/V of the filled part,
2 * filled * D * 2 in bf16, plus the float32 partials written and read again, about
2 * (filled / chunk) * GROUP * D * 4: 2 * GROUP / chunk of the K/V bytes, 1/16 at GROUP = 4 and
chunk 128. Prefill (S > 1, or S symbolic as in the prefill graph) and decode over a cache of at most
SINGLE_PASS_MAX_CACHE positions keep the single-pass kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.library import triton_op, wrap_triton

from oiv2compile.kernels._triton import (
    HAS_TRITON,
    dependents_may_launch_early,
    launch_dependents,
    next_power_of_2,
    registering_triton_op,
    tl,
    triton,
)

# Keys per inner step of both kernels.
BLOCK_N = 64
# Positions per program of a split decode call, a multiple of BLOCK_N. Fixed, not derived from T, so
# that a call's work follows the filled length: filled 4000 runs the same programs in a cache of 4096
# as in one of 8192, plus programs that return at once. At batch 1 with 8 kv heads, 4000 positions
# make 32 chunks per head, 256 programs: about 2 per SM of an H100.
DECODE_CHUNK = 128
# The longest cache a decode call reads in one pass. Up to two chunks the split path still pays a
# second kernel (the combine) and its launch gap for at most two partials per head, more than the
# single pass's extra steps over the same few positions cost. H100, llama-1b heads (32/8, D 64),
# bf16: in a cache of 512 the single pass takes 3.2-5.2 us up to filled 256 against 6.0 for 4 splits
# and loses from filled 384 (6.5 against 6.1); llama-1b decode with a 256 cache went from 822.5 to
# 867.2 tok/s without the combine (benchmarks/RESULTS.md, c3714b5).
SINGLE_PASS_MAX_CACHE = 2 * DECODE_CHUNK


def attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The spec, and the CPU path. Reads whole cache rows and masks what is not yet filled."""
    _B, Hq, S, _D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    k = k_cache[slots].float()  # [B, Hkv, T, D]
    v = v_cache[slots].float()
    # Split heads into (kv head, group) without reshaping q: q is usually a transposed view, and a
    # reshape of it would put a guard on the symbolic prompt length.
    qg = q.float().unflatten(1, (Hkv, Hq // Hkv))  # [B, Hkv, G, S, D]
    scores = torch.einsum("bhgsd,bhtd->bhgst", qg, k) * scale
    q_pos = positions[:, None] + torch.arange(S, device=q.device)[None, :]  # [B, S]
    visible = torch.arange(T, device=q.device)[None, None, :] <= q_pos[:, :, None]  # [B, S, T]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Zero weight times a stale NaN past the filled part would still be NaN: clear those rows of v.
    filled = torch.arange(T, device=q.device)[None, :] < (positions + S)[:, None]  # [B, T]
    v = v.masked_fill(~filled[:, None, :, None], 0.0)
    out = torch.einsum("bhgst,bhtd->bhgsd", probs, v)  # [B, Hkv, G, S, D]
    return out.flatten(1, 2).to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _rope_token(
        Row,
        CosTable,
        SinTable,
        PositionId,
        TABLE_LEN,
        start,
        kvh,
        head,
        row_valid,
        d,
        d_valid,
        NUM_HEADS: tl.constexpr,
        num_kv_heads,
        HEAD_DIM: tl.constexpr,
        CACHE_POSITIONS: tl.constexpr,
    ):
        """One new token of oiv2::rope_kv_write_attention: (q [BLOCK_M, BLOCK_D] of the heads `head`,
        rotated and rounded to the row's dtype as oiv2::rope_kv_write writes it; kv head kvh's key
        [BLOCK_D], rotated, in float32; its value [BLOCK_D]). Row points at the token's
        [q heads | k heads | v heads] row, PositionId at its rotary position (read unless
        CACHE_POSITIONS: then it is the cache position, start)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        if CACHE_POSITIONS:
            rotary_pos = start
        else:
            rotary_pos = tl.load(PositionId)
        rotary_pos = tl.minimum(tl.maximum(rotary_pos, 0), TABLE_LEN - 1).to(tl.int64)
        # Feature d turns with its partner (d + D/2) mod D by the table's angle d mod D/2:
        # x' = x * cos - partner * sin below D/2, x * cos + partner * sin above.
        partner = (d + HALF) % HEAD_DIM
        c = tl.load(CosTable + rotary_pos * HALF + d % HALF, mask=d_valid, other=0.0).to(tl.float32)
        sn = tl.load(SinTable + rotary_pos * HALF + d % HALF, mask=d_valid, other=0.0).to(tl.float32)
        sn = tl.where(d < HALF, -sn, sn)
        q_mask = row_valid[:, None] & d_valid[None, :]
        q_row = Row + head[:, None] * HEAD_DIM  # [BLOCK_M, 1]
        x = tl.load(q_row + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        x_partner = tl.load(q_row + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q = (x * c[None, :] + x_partner * sn[None, :]).to(Row.dtype.element_ty)
        k_row = Row + (NUM_HEADS + kvh) * HEAD_DIM
        k = tl.load(k_row + d, mask=d_valid, other=0.0).to(tl.float32)
        k_partner = tl.load(k_row + partner, mask=d_valid, other=0.0).to(tl.float32)
        v = tl.load(Row + (NUM_HEADS + num_kv_heads + kvh) * HEAD_DIM + d, mask=d_valid, other=0.0)
        return q, k * c + k_partner * sn, v

    @triton.jit
    def _write_token(Dst, value, mask):
        tl.store(Dst, value.to(Dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _attend_new_token(q, k_new, v_new, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
        """One more key and value for every query row, the new token's, as the loop would add it: the
        score of q against the key rounded to q's dtype, the weight rounded to the value's dtype before
        its product (not in float32). Outside the loop, so that the loop reads the cache as
        oiv2::attention does: with the token's row substituted into the loop's tiles instead, llama-8b
        int8 decode ran at 0.964x of the unfused pair's tokens/s, with this at 0.988x (H200, two runs,
        8dc5445 and 537801e; benchmarks/RESULTS.md)."""
        k = k_new.to(q.dtype).to(tl.float32)  # [BLOCK_D]
        s = tl.sum(q.to(tl.float32) * k[None, :], axis=1) * qk_scale  # [BLOCK_M]
        m_new = tl.maximum(m_i, s)  # finite: s is
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        v = v_new.to(tl.float32)
        if not IEEE:
            p = p.to(v_new.dtype).to(tl.float32)
        return m_new, l_i, acc * alpha[:, None] + p[:, None] * v[None, :]

    @triton.jit
    def _attention_kernel(
        Q,
        K,
        V,
        Out,
        Slots,
        Positions,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_qd,
        stride_kn,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vn,
        stride_vh,
        stride_vt,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_os,
        stride_od,
        S,
        T,
        num_kv_heads,
        SCALE: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
        LAUNCH_DEPENDENTS: tl.constexpr,
        QKV,
        CosTable,
        SinTable,
        PositionIds,
        stride_xb,
        stride_pb,
        TABLE_LEN,
        ROPE: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        CACHE_POSITIONS: tl.constexpr,
    ):
        # The o projection streams its weights meanwhile.
        pid_m = tl.program_id(0) + launch_dependents(LAUNCH_DEPENDENTS)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_kv_heads
        kvh = pid_bh % num_kv_heads
        slot = tl.load(Slots + b)
        start = tl.load(Positions + b)

        # Query rows of this block: the group's heads times the S new tokens, head-major.
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < GROUP * S
        head = kvh * GROUP + rows // S
        t = rows % S
        q_pos = start + t
        d = tl.arange(0, BLOCK_D)
        d_valid = d < HEAD_DIM

        k_base = K + slot.to(tl.int64) * stride_kn + kvh * stride_kh
        v_base = V + slot.to(tl.int64) * stride_vn + kvh * stride_vh
        if ROPE:  # one new token (t = 0): q, k and v from the projection's row; k and v into the cache
            q, k_new, v_new = _rope_token(
                QKV + b.to(tl.int64) * stride_xb,
                CosTable,
                SinTable,
                PositionIds + b.to(tl.int64) * stride_pb,
                TABLE_LEN,
                start,
                kvh,
                head,
                row_valid,
                d,
                d_valid,
                NUM_HEADS,
                num_kv_heads,
                HEAD_DIM,
                CACHE_POSITIONS,
            )
            if (pid_m == 0) & (start < T):
                _write_token(k_base + start * stride_kt + d * stride_kd, k_new, d_valid)
                _write_token(v_base + start * stride_vt + d * stride_vd, v_new, d_valid)
        else:
            q = tl.load(
                Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qs + d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
        # Only the filled part: up to the last query row's own position; with ROPE the positions before
        # the new token, whose key and value come from registers after the loop.
        if ROPE:
            kv_len = tl.minimum(start, T)
        else:
            kv_len = tl.minimum(start + tl.max(tl.where(row_valid, t, 0), axis=0) + 1, T)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # exp(x) = exp2(x * log2(e)). SCALE is a compile-time constant: as a run-time argument
        # AOTInductor would pass it as a double and turn the loop's float32 state into float64.
        qk_scale = SCALE * 1.4426950408889634
        for n0 in range(0, kv_len, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_valid = n < kv_len
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + n[:, None] * stride_kt + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale
            visible = (n[None, :] <= q_pos[:, None]) & n_valid[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen no visible key yet keeps m = -inf; subtract 0 there to avoid NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * stride_vt + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if ROPE:
            if start < T:  # past the cache the token is not written, and attention reads the cache alone
                m_i, l_i, acc = _attend_new_token(q, k_new, v_new, m_i, l_i, acc, qk_scale, IEEE)
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            Out + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_os + d[None, :] * stride_od,
            out.to(Out.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )

    @triton.jit
    def _attention_split_kernel(
        Q,
        K,
        V,
        MaxPart,
        SumPart,
        AccPart,
        Slots,
        Positions,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kn,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vn,
        stride_vh,
        stride_vt,
        stride_vd,
        T,
        num_kv_heads,
        SCALE: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CHUNK: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        IEEE: tl.constexpr,
        QKV,
        CosTable,
        SinTable,
        PositionIds,
        stride_xb,
        stride_pb,
        TABLE_LEN,
        ROPE: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        CACHE_POSITIONS: tl.constexpr,
    ):
        split = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_kv_heads
        kvh = pid_bh % num_kv_heads
        # The group's query heads are the rows of one tile: each K/V byte of the chunk is read once.
        rows = tl.arange(0, BLOCK_M)
        row_valid = rows < GROUP
        head = kvh * GROUP + rows
        d = tl.arange(0, BLOCK_D)
        d_valid = d < HEAD_DIM
        # Partials are [B, Hq, NUM_SPLITS] (and [..., HEAD_DIM] for acc), row-major.
        part = (b.to(tl.int64) * num_kv_heads * GROUP + head) * NUM_SPLITS + split  # [BLOCK_M]
        start = tl.load(Positions + b)  # the new token's position
        kv_len = tl.minimum(start + 1, T)
        lo = split * CHUNK

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        # A chunk past the filled length loads nothing: its partial is empty (m = -inf, l = 0).
        if lo < kv_len:
            slot = tl.load(Slots + b)
            k_base = K + slot.to(tl.int64) * stride_kn + kvh * stride_kh
            v_base = V + slot.to(tl.int64) * stride_vn + kvh * stride_vh
            if ROPE:  # every program rotates q; the one whose chunk holds the new token writes it
                q, k_new, v_new = _rope_token(
                    QKV + b.to(tl.int64) * stride_xb,
                    CosTable,
                    SinTable,
                    PositionIds + b.to(tl.int64) * stride_pb,
                    TABLE_LEN,
                    start,
                    kvh,
                    head,
                    row_valid,
                    d,
                    d_valid,
                    NUM_HEADS,
                    num_kv_heads,
                    HEAD_DIM,
                    CACHE_POSITIONS,
                )
                if (start < lo + CHUNK) & (start < T):  # lo <= start here
                    _write_token(k_base + start * stride_kt + d * stride_kd, k_new, d_valid)
                    _write_token(v_base + start * stride_vt + d * stride_vd, v_new, d_valid)
            else:
                q = tl.load(
                    Q + b * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_valid[:, None] & d_valid[None, :],
                    other=0.0,
                )
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            qk_scale = SCALE * 1.4426950408889634  # exp(x) = exp2(x * log2(e)); see _attention_kernel
            # A constant trip count: the last filled chunk masks its tail (a loop bounded by a loaded
            # value also fails in Triton's interpreter under numpy 2, where scalars are 1-element arrays).
            # With ROPE the cache's positions before the new token; its own comes after the loop.
            cache_len = tl.minimum(start, T) if ROPE else kv_len
            for i in range(0, CHUNK // BLOCK_N):
                n = lo + i * BLOCK_N + tl.arange(0, BLOCK_N)
                n_valid = n < cache_len
                kv_mask = n_valid[:, None] & d_valid[None, :]
                k = tl.load(k_base + n[:, None] * stride_kt + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                # One new token per sequence: every filled position is visible to every row.
                s = tl.where(n_valid[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_base + n[:, None] * stride_vt + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
                if IEEE:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            if ROPE:
                if (start < lo + CHUNK) & (start < T):  # this chunk holds the new token
                    m_i, l_i, acc = _attend_new_token(q, k_new, v_new, m_i, l_i, acc, qk_scale, IEEE)
            tl.store(
                AccPart + part[:, None] * HEAD_DIM + d[None, :],
                acc,
                mask=row_valid[:, None] & d_valid[None, :],
            )
        tl.store(MaxPart + part, m_i, mask=row_valid)
        tl.store(SumPart + part, l_i, mask=row_valid)

    @triton.jit
    def _attention_combine_kernel(
        MaxPart,
        SumPart,
        AccPart,
        Out,
        Positions,
        stride_ob,
        stride_oh,
        stride_od,
        T,
        num_heads,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        CHUNK: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        LAUNCH_DEPENDENTS: tl.constexpr,
    ):
        # b * Hq + head; the o projection streams its weights meanwhile.
        pid = tl.program_id(0) + launch_dependents(LAUNCH_DEPENDENTS)
        b = pid // num_heads
        h = pid % num_heads
        kv_len = tl.minimum(tl.load(Positions + b) + 1, T)
        # Only the chunks below the filled length were written with data; the rest are never read.
        used = (kv_len + CHUNK - 1) // CHUNK
        d = tl.arange(0, BLOCK_D)
        d_valid = d < HEAD_DIM
        base = pid.to(tl.int64) * NUM_SPLITS
        # Loop-carried scalars typed as float32 tensors from the start (a Python float would enter the
        # loop as a constant of another type).
        m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
        l_run = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
        acc_run = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_valid = s < used
            m = tl.load(MaxPart + base + s, mask=s_valid, other=float("-inf"))
            total = tl.load(SumPart + base + s, mask=s_valid, other=0.0)
            acc = tl.load(
                AccPart + (base + s)[:, None] * HEAD_DIM + d[None, :],
                mask=s_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            m_new = tl.maximum(m_run, tl.max(m, axis=0))
            # Split 0 always holds position 0, so m_new is finite; the guard keeps a tile of empty
            # partials (m = -inf) at weight 0 instead of exp2(-inf + inf) = NaN all the same.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_run - m_safe)
            w = tl.exp2(m - m_safe)  # [BLOCK_S]; 0 for empty and unused splits
            l_run = l_run * alpha + tl.sum(w * total, axis=0)
            acc_run = acc_run * alpha + tl.sum(w[:, None] * acc, axis=0)
            m_run = m_new
        out = acc_run / tl.where(l_run > 0.0, l_run, 1.0)
        tl.store(
            Out + b * stride_ob + h * stride_oh + d * stride_od,
            out.to(Out.dtype.element_ty),
            mask=d_valid,
        )


def decode_splits(
    new_tokens: int | torch.SymInt,
    batch: int | torch.SymInt,
    kv_heads: int,
    cache_len: int | torch.SymInt,
    sm_count: int,
    chunk: int = DECODE_CHUNK,
) -> int:
    """How many programs share each (sequence, kv head) of a call: ceil(cache_len / chunk) for a
    decode call (one new token per sequence) over a cache longer than SINGLE_PASS_MAX_CACHE; 1, the
    single-pass kernel, for prefill, for a shorter cache, and where the batch alone gives every SM two
    programs.
    Sizes may be symbolic when an artifact is traced (the prompt length of prefill, the batch of
    decode): branch only on ints, so no guard is added. A symbolic batch counts as 1."""
    if not (isinstance(new_tokens, int) and new_tokens == 1 and isinstance(cache_len, int)):
        return 1
    if cache_len <= SINGLE_PASS_MAX_CACHE:
        return 1
    if isinstance(batch, int) and batch * kv_heads >= 2 * sm_count:
        return 1
    return -(-cache_len // chunk)


class RotaryToken(NamedTuple):
    """What oiv2::rope_kv_write_attention gives the decode kernels in place of q: the new token's
    fused projection row qkv [B, 1, (Hq + 2 Hkv) * D], the rotary tables [L, D/2], the rotary
    position ids [B, 1] or None (the cache positions), and Hq. The kernels rotate q and k themselves,
    write k and v into the caches, and take the new position's key and value from registers."""

    qkv: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    position_ids: torch.Tensor | None
    num_heads: int


def _attention_triton(
    q: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    splits: int | None = None,
    rope: RotaryToken | None = None,
) -> torch.Tensor:
    """splits: programs per (sequence, kv head) of a decode call; None plans them (decode_splits),
    1 forces the single-pass kernel (the benchmark's baseline). rope: q is None, and the new token
    comes from rope.qkv (one token per sequence)."""
    B, _Hq, S, _D = _query_shape(q, k_cache, rope)
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    if splits is None:
        splits = decode_splits(S, B, Hkv, T, _sm_count(k_cache.device))
    if splits == 1:
        return _attention_single(q, k_cache, v_cache, slots, positions, scale, rope)
    if not (isinstance(S, int) and S == 1 and isinstance(T, int)):
        raise ValueError(f"split attention takes one new token per sequence and a fixed cache length, not S={S}, T={T}")
    # Whole steps of BLOCK_N per chunk; the last chunk may end past T (its tail is masked).
    chunk = BLOCK_N * triton.cdiv(triton.cdiv(T, BLOCK_N), splits)
    return _attention_split(q, k_cache, v_cache, slots, positions, scale, chunk, rope)


def _query_shape(q: torch.Tensor | None, k_cache: torch.Tensor, rope: RotaryToken | None) -> tuple[Any, ...]:
    """(B, Hq, S, D) of the queries: q's, or the fused row's (S = 1)."""
    if rope is None:
        if q is None:
            raise ValueError("attention takes q, or the fused row of a rotary token")
        return tuple(q.shape)
    B, S, width = rope.qkv.shape
    return B, rope.num_heads, S, width // (rope.num_heads + 2 * k_cache.shape[1])


def _query_args(q: torch.Tensor | None, rope: RotaryToken | None, positions: torch.Tensor) -> dict[str, Any]:
    """The kernels' query arguments: Q and its strides, or the fused row, its tables and positions
    (Q then unused)."""
    if rope is None:
        return dict(
            Q=q,
            QKV=q,
            CosTable=q,
            SinTable=q,
            PositionIds=positions,
            stride_xb=0,
            stride_pb=0,
            TABLE_LEN=1,
            ROPE=False,
            NUM_HEADS=1,
            CACHE_POSITIONS=True,
        )
    qkv = rope.qkv if rope.qkv.stride(-1) == 1 else rope.qkv.contiguous()
    ids = rope.position_ids
    return dict(
        Q=qkv,
        QKV=qkv,
        CosTable=rope.cos_table.contiguous(),  # [L, D/2]
        SinTable=rope.sin_table.contiguous(),
        PositionIds=positions if ids is None else ids,  # [B, 1]; not read where CACHE_POSITIONS
        stride_xb=qkv.stride(0),
        stride_pb=0 if ids is None else ids.stride(0),
        TABLE_LEN=rope.cos_table.shape[0],
        ROPE=True,
        NUM_HEADS=rope.num_heads,
        CACHE_POSITIONS=ids is None,
    )


def _attention_single(
    q: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    rope: RotaryToken | None = None,
) -> torch.Tensor:
    B, Hq, S, D = _query_shape(q, k_cache, rope)
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    query = _query_args(q, rope, positions)
    like = query.pop("Q")  # q, or the fused row
    out = torch.empty((B, Hq, S, D), dtype=like.dtype, device=like.device)
    q_strides = q.stride() if q is not None else (0, 0, 0, 0)
    # S is symbolic in the prefill graph: branch only on a concrete size so no shape guard is added.
    block_m = 16 if isinstance(S, int) and group * S <= 16 else 64
    grid = (triton.cdiv(group * S, block_m), B * Hkv)
    wrap_triton(_attention_kernel)[grid](
        like,
        k_cache,
        v_cache,
        out,
        slots,
        positions,
        *q_strides,
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        S,
        T,
        Hkv,
        SCALE=scale,
        GROUP=group,
        HEAD_DIM=D,
        BLOCK_D=max(16, next_power_of_2(D)),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        IEEE=like.dtype == torch.float32,
        LAUNCH_DEPENDENTS=dependents_may_launch_early(like.device),
        **query,
        num_warps=4,
    )
    return out


def _attention_split(
    q: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    chunk: int,
    rope: RotaryToken | None = None,
) -> torch.Tensor:
    """Flash-decoding of q [B, Hq, 1, D]: programs of `chunk` positions (a multiple of BLOCK_N), then
    one program per (sequence, query head) combining their partials."""
    B, Hq, _S, D = _query_shape(q, k_cache, rope)
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    splits = triton.cdiv(T, chunk)
    block_d = max(16, next_power_of_2(D))
    query = _query_args(q, rope, positions)
    like = query.pop("Q")  # q, or the fused row
    q_strides = q.stride() if q is not None else (0, 0, 0, 0)
    # Each program's running max, sum and un-normalized output, float32.
    max_part = torch.empty((B, Hq, splits), dtype=torch.float32, device=like.device)  # [B, Hq, splits]
    sum_part = torch.empty((B, Hq, splits), dtype=torch.float32, device=like.device)
    acc_part = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=like.device)  # [B, Hq, splits, D]
    out = torch.empty((B, Hq, 1, D), dtype=like.dtype, device=like.device)
    wrap_triton(_attention_split_kernel)[(splits, B * Hkv)](
        like,
        k_cache,
        v_cache,
        max_part,
        sum_part,
        acc_part,
        slots,
        positions,
        q_strides[0],
        q_strides[1],
        q_strides[3],
        *k_cache.stride(),
        *v_cache.stride(),
        T,
        Hkv,
        SCALE=scale,
        GROUP=group,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        # tl.dot takes at least 16 rows; rows past the group are masked.
        BLOCK_M=max(16, next_power_of_2(group)),
        BLOCK_N=BLOCK_N,
        CHUNK=chunk,
        NUM_SPLITS=splits,
        IEEE=like.dtype == torch.float32,
        **query,
        num_warps=4,
    )
    wrap_triton(_attention_combine_kernel)[(B * Hq,)](
        max_part,
        sum_part,
        acc_part,
        out,
        positions,
        out.stride(0),
        out.stride(1),
        out.stride(3),
        T,
        Hq,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        BLOCK_S=min(32, next_power_of_2(splits)),
        CHUNK=chunk,
        NUM_SPLITS=splits,
        LAUNCH_DEPENDENTS=dependents_may_launch_early(like.device),
        num_warps=4,
    )
    return out


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# triton_op, not custom_op: AOTInductor sees into the Triton kernel and compiles it into the package.
# On CPU the body traces to the reference, which Inductor compiles like any other ATen code. The
# body doubles as the fake implementation (triton_op registers it as such): shapes come from q alone.
with registering_triton_op():

    @triton_op("oiv2::attention", mutates_args=())
    def attention(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        if HAS_TRITON and q.device.type == "cuda":
            return _attention_triton(q, k_cache, v_cache, slots, positions, scale)
        return attention_ref(q, k_cache, v_cache, slots, positions, scale)
