"""oiv2::linear_int4: y = x @ W^T (+ bias) with W stored as 4-bit integers, a scale and a zero point
per group of `group_size` input features.

Layout ("int4-rowmajor-lowfirst-v1"): packed [N, K/2] uint8, row n holding output channel n, byte j
holding input features 2j (low nibble) and 2j + 1 (high nibble), values in [0, 15]; scales and
zeros [N, K/group_size] in the activation dtype (zeros are whole numbers in [0, 15]);
W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]. `quantize` makes the layout from a
float weight by rounding to nearest (asymmetric: each group's range maps onto 0..15).

The op's body is its reference (the spec): on the CPU, and for now on CUDA, Inductor inlines it. The
streaming CUDA kernel of issue 5 replaces the CUDA path behind the same schema.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op

from oiv2compile.kernels._triton import registering_triton_op

LAYOUT = "int4-rowmajor-lowfirst-v1"
QMAX = 15
# Each group's range is the min-max range shrunk by the one of these factors that gives the smallest
# squared error: clipping a few outliers buys a finer step for the rest (about +0.5 dB on Gaussian
# weights over plain min-max).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(packed [N, K/2] uint8, scales [N, K/g], zeros [N, K/g], both in `dtype`) of a float weight
    [N, K] whose K is a multiple of `group_size`, round to nearest."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    best_err = torch.full_like(low, float("inf"))
    scales, zeros = torch.empty_like(low, dtype=dtype), torch.empty_like(low, dtype=dtype)
    for ratio in CLIP_RATIOS:
        s, z = _scale_and_zero(low * ratio, high * ratio, dtype)
        err = (_dequantize_groups(_round(w, s, z), s, z) - w).pow(2).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
    return pack(_round(w, scales, zeros).reshape(n, k)), scales, zeros


def _scale_and_zero(low: torch.Tensor, high: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (whole numbers) in `dtype` that map [low, high] onto 0..QMAX."""
    scales = ((high - low) / QMAX).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    zeros = torch.round(-low / scales.float()).clamp(0, QMAX).to(dtype)
    return scales, zeros


def _round(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Grouped float weights [N, G, g] to the nearest levels in 0..QMAX, uint8."""
    q = torch.round(w / scales.float()[..., None] + zeros.float()[..., None])
    return q.clamp(0, QMAX).to(torch.uint8)


def _dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return (q.float() - zeros.float()[..., None]) * scales.float()[..., None]


def pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values in [0, 15] → [N, K/2] uint8, even features in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 → [N, K] uint8 values in [0, 15]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=2).reshape(packed.shape[0], -1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] (in the scales' dtype) that the layout stands for."""
    q = unpack(packed)
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.reshape(n, groups, k // groups).to(scales.dtype) - zeros[..., None]) * scales[..., None]
    return w.reshape(n, k)


def linear_int4_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec, and the CPU path: dequantize, then a plain linear."""
    y = F.linear(x, dequantize(packed, scales.to(x.dtype), zeros.to(x.dtype)))
    return y + bias if bias is not None else y


with registering_triton_op():

    @triton_op("oiv2::linear_int4", mutates_args=())
    def linear_int4(
        x: torch.Tensor,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_int4_ref(x, packed, scales, zeros, bias)
