"""oiv2::kv_write: write the keys (or values) of new tokens into the executor's cache, in place.

Shapes: cache [N, H, T, D] (N cache rows, T = max_seq_len), values [B, H, S, D] (S new tokens of B
sequences), slots [B] and positions [B] int64. Token t of sequence b goes to
cache[slots[b], :, positions[b] + t, :]. Returns nothing; the cache is mutated.

The executor keeps positions[b] + S <= T. The CUDA kernel drops writes past T rather than touching
memory it does not own; the reference raises an index error there instead.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from oiv2compile.kernels._triton import HAS_TRITON, next_power_of_2, registering_triton_op, tl, triton


def kv_write_ref(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
    """The spec, and the CPU path."""
    _B, H, S, _D = values.shape
    heads = torch.arange(H, device=values.device)
    pos = positions[:, None] + torch.arange(S, device=values.device)[None, :]  # [B, S]
    cache.index_put_((slots[:, None, None], heads[None, :, None], pos[:, None, :]), values.to(cache.dtype))


if HAS_TRITON:

    @triton.jit
    def _kv_write_kernel(
        Cache,
        Values,
        Slots,
        Positions,
        stride_cn,
        stride_ch,
        stride_ct,
        stride_cd,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_vd,
        H,
        S,
        T,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (sequence, head, new token): one row of HEAD_DIM elements.
        pid = tl.program_id(0)
        s = pid % S
        h = (pid // S) % H
        b = pid // (S * H)
        slot = tl.load(Slots + b)
        pos = tl.load(Positions + b) + s
        d = tl.arange(0, BLOCK_D)
        mask = (d < HEAD_DIM) & (pos < T)
        x = tl.load(Values + b * stride_vb + h * stride_vh + s * stride_vs + d * stride_vd, mask=mask)
        dst = Cache + slot * stride_cn + h * stride_ch + pos * stride_ct + d * stride_cd
        tl.store(dst, x.to(Cache.dtype.element_ty), mask=mask)


def _kv_write_triton(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
    B, H, S, D = values.shape
    T = cache.shape[2]
    wrap_triton(_kv_write_kernel)[(B * H * S,)](
        cache,
        values,
        slots,
        positions,
        *cache.stride(),
        *values.stride(),
        H,
        S,
        T,
        HEAD_DIM=D,
        BLOCK_D=next_power_of_2(D),
        num_warps=1 if D <= 128 else 2,
    )


# See attention.py for why triton_op and why the Triton warning is silenced on CPU.
with registering_triton_op():

    @triton_op("oiv2::kv_write", mutates_args={"cache"})
    def kv_write(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
        if HAS_TRITON and cache.device.type == "cuda":
            _kv_write_triton(cache, values, slots, positions)
        else:
            kv_write_ref(cache, values, slots, positions)
