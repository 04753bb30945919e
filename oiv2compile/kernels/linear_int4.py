"""oiv2::linear_int4: y = x @ W^T (+ bias) with W stored as 4-bit integers, a scale and a zero point
per group of `group_size` input features.

Layout ("int4-grouphalves-v2"): packed [N, K/2] uint8, row n holding output channel n; within each
group of g input features, byte j (0 <= j < g/2) holds feature j of the group in its low nibble and
feature g/2 + j in its high nibble, values in [0, 15]; scales and zeros [N, K/g] in the activation
dtype (zeros are whole numbers in [0, 15]); W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g].
The kernel reads a group's bytes as two contiguous half-group tiles (low nibbles, high nibbles) with
no interleaving in registers: interleaving even and odd features (the v1 layout) cost the Triton
kernel two thirds of its bandwidth on an H100. `quantize` makes the layout from a float weight by
rounding to nearest (asymmetric: each group's range maps onto 0..15).

On the CPU, and for prefill-sized inputs on CUDA, the op's body is its reference (the spec), which
Inductor inlines: dequantize, then one matrix product. For decode-sized inputs on CUDA it is the
Triton kernel of `_quant_matmul`, which streams the packed bytes once. CUDA builds with the C++ ops
(passes/use_cuda_kernels.py) repack the weights for oiv2::linear_int4_mma instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op

from oiv2compile.kernels._quant_matmul import quant_matmul, takes
from oiv2compile.kernels._triton import HAS_TRITON, registering_triton_op

LAYOUT = "int4-grouphalves-v2"
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
    return pack(_round(w, scales, zeros).reshape(n, k), group_size), scales, zeros


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


def pack(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] values in [0, 15] → [N, K/2] uint8: in each group, its first half in the low nibbles."""
    n, k = q.shape
    halves = q.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)


def unpack(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K/2] uint8 → [N, K] uint8 values in [0, 15]."""
    n = packed.shape[0]
    grouped = packed.reshape(n, -1, group_size // 2)
    return torch.stack((grouped & 0xF, grouped >> 4), dim=2).reshape(n, -1)


def group_size_of(packed: torch.Tensor, scales: torch.Tensor) -> int:
    return 2 * packed.shape[1] // scales.shape[1]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] (in the scales' dtype) that the layout stands for."""
    return dequantize_levels(unpack(packed, group_size_of(packed, scales)), scales, zeros)


def dequantize_levels(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Levels [N, K] with scales and zeros [N, K/g] → the float weight [N, K] in the scales' dtype."""
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
        group = x.shape[-1] // scales.shape[1]
        if HAS_TRITON and x.device.type == "cuda" and takes(x, 4, group):
            y = quant_matmul(x, packed, scales, zeros, bits=4, group=group)
            return y + bias if bias is not None else y
        return linear_int4_ref(x, packed, scales, zeros, bias)
