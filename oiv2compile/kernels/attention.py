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
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from oiv2compile.kernels._triton import HAS_TRITON, next_power_of_2, registering_triton_op, tl, triton


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
    ):
        pid_m = tl.program_id(0)
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

        q = tl.load(
            Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qs + d[None, :] * stride_qd,
            mask=row_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        # Only the filled part: up to the last query row's own position.
        kv_len = tl.minimum(start + tl.max(tl.where(row_valid, t, 0), axis=0) + 1, T)
        k_base = K + slot.to(tl.int64) * stride_kn + kvh * stride_kh
        v_base = V + slot.to(tl.int64) * stride_vn + kvh * stride_vh

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
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            Out + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_os + d[None, :] * stride_od,
            out.to(Out.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )


def _attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    B, Hq, S, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    # S is symbolic in the prefill graph: branch only on a concrete size so no shape guard is added.
    block_m = 16 if isinstance(S, int) and group * S <= 16 else 64
    grid = (triton.cdiv(group * S, block_m), B * Hkv)
    wrap_triton(_attention_kernel)[grid](
        q,
        k_cache,
        v_cache,
        out,
        slots,
        positions,
        *q.stride(),
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
        BLOCK_N=64,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    return out


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
