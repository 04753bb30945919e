"""oiv2::linear_int8: y = x @ W^T (+ bias) with W stored as int8, one scale per output channel.

Layout ("int8-rowmajor-v1"): qweight [N, K] int8, row n holding output channel n, values in
[-127, 127]; scales [N] in the activation dtype; W[n, k] = qweight[n, k] * scales[n] (symmetric, no
zero point). `quantize` makes the layout from a float weight by rounding to nearest.

Layout "int8-tiles16x1024-v2" (`tile`; CUDA builds, passes/tile_int8_weights.py): the same values as
qweight [N/16, 16, K] (N a multiple of 16, K of 128), tile row r of block b being weight row 16b + r; or, paired
(a gated MLP's fused gate/up weight, `tile(q, paired=True)`), qweight [N/16, 2, 8, K], tile rows 0-7 of block b
being the gate rows 8b.. and tile rows 8-15 the up rows N/2 + 8b.. of the same outputs. A block's features come
in tiles of 1024: tile j (features 1024j.., width w = min(1024, K - 1024j)) is 16 w bytes, in slices of 128
features (2048 bytes) in the order of the one-row product's fragments: the 16-byte unit u = (k % 1024) / 16
(16 features) of tile row r sits at byte (u / 8) 2048 + ((u / 4) % 2) 1024 + (r / 8) 512 + (4 (r % 8) + u % 4) 16
of the tile. So the bytes a decode kernel streams, a stage of 16 rows x 1024 features (gated: the gate and up
rows of 8 outputs), lie together (one bulk copy, where 16 copies of 1 KB a row cost 141 us a step of 32 llama-8b
layers: benchmarks/RESULTS.md), and a consumer warp's 128-feature slice of them is 4 loads of 512 contiguous
bytes, a lane's 16 bytes each: its A fragments of two integer k-steps. Every int8 kernel reads every layout;
the scales stay [N]. (v1, an XOR swizzle of each row's units, took 16 more instructions a stage.)

On the CPU, and for prefill-sized inputs on CUDA, the op's body is its reference (the spec), which
Inductor inlines: one fused pass that dequantizes the weight, then one matrix product.
For decode-sized inputs on CUDA it is the Triton kernel of `_quant_matmul`, which streams the int8
weights once and converts them in registers. CUDA builds through Inductor replace the op with the C++
ops on the same tensors where they apply (passes/use_cuda_kernels.py): oiv2::linear_int8_gemv for one
row, oiv2::linear_int8_gemm for prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op

from oiv2compile.kernels._quant_matmul import quant_matmul, takes
from oiv2compile.kernels._triton import HAS_TRITON, registering_triton_op

LAYOUT = "int8-rowmajor-v1"
TILES_LAYOUT = "int8-tiles16x1024-v2"
PAIRED_TILES_LAYOUT = "int8-tiles16x1024-paired-v2"
QMAX = 127
TILE_ROWS = 16
TILE_FEATURES = 1024
SLICE = 128  # features of a consumer warp's slice of a tile
UNIT = 16  # bytes a lane loads


def tiles_fit(n: int, k: int) -> bool:
    """Whether a weight [N, K] fits int8-tiles16x1024-v2 (paired too)."""
    return n % TILE_ROWS == 0 and k % SLICE == 0 and n > 0 and k > 0


def tile(qweight: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """int8-rowmajor-v1 [N, K] → int8-tiles16x1024-v2 [N/16, 16, K] (paired: [N/16, 2, 8, K])."""
    n, k = qweight.shape
    if not tiles_fit(n, k):
        raise ValueError(f"int8 tiles take N a multiple of 16 and K of 128, not {n} x {k}")
    if paired:  # block b: the gate rows 8b.. then the up rows N/2 + 8b..
        blocks = torch.stack([qweight[: n // 2], qweight[n // 2 :]]).reshape(2, n // 16, 8, k).transpose(0, 1)
    else:
        blocks = qweight.reshape(n // TILE_ROWS, TILE_ROWS, k)
    nb = n // TILE_ROWS
    parts = []
    for j in range(0, k, TILE_FEATURES):
        w = min(TILE_FEATURES, k - j)
        # [block, row half, row % 8, slice, unit pair, unit % 4, byte] → [block, slice, pair, half, row % 8, unit % 4, byte]
        units = blocks[..., j : j + w].reshape(nb, 2, 8, w // SLICE, 2, 4, UNIT)
        parts.append(units.permute(0, 3, 4, 1, 2, 5, 6).reshape(nb, TILE_ROWS * w))
    out = torch.cat(parts, dim=1)
    return out.reshape(nb, 2, 8, k) if paired else out.reshape(nb, TILE_ROWS, k)


def untile(tiles: torch.Tensor) -> torch.Tensor:
    """int8-tiles16x1024-v2 [N/16, 16, K] or [N/16, 2, 8, K] (paired) → int8-rowmajor-v1 [N, K]."""
    nb, k = tiles.shape[0], tiles.shape[-1]
    flat = tiles.reshape(nb, TILE_ROWS * k)
    parts = []
    for j in range(0, k, TILE_FEATURES):
        w = min(TILE_FEATURES, k - j)
        units = flat[:, TILE_ROWS * j : TILE_ROWS * (j + w)].reshape(nb, w // SLICE, 2, 2, 8, 4, UNIT)
        parts.append(units.permute(0, 3, 4, 1, 2, 5, 6).reshape(nb, TILE_ROWS, w))
    blocks = torch.cat(parts, dim=2)  # [N/16, 16, K]: block b's tile rows
    if tiles.dim() == 4:
        return blocks.reshape(nb, 2, 8, k).transpose(0, 1).reshape(nb * TILE_ROWS, k)
    return blocks.reshape(nb * TILE_ROWS, k)


def rows_of(qweight: torch.Tensor) -> int:
    """N of an int8 weight in any layout."""
    return qweight.numel() // qweight.shape[-1] if qweight.shape[-1] else qweight.shape[0]


def row_major(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [N, K] in int8-rowmajor-v1, whichever layout it comes in."""
    return untile(qweight) if qweight.dim() > 2 else qweight


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight [N, K] int8, scales [N] in `dtype`) of a float weight [N, K], round to nearest.

    The scale is rounded to `dtype` before the weights are divided by it, so that dequantizing with
    the stored scale gives back what was rounded."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scales


def dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] (in the scales' dtype) that the layout (either) stands for."""
    qweight = row_major(qweight)
    return (qweight.float() * scales.float()[:, None]).to(scales.dtype)


def linear_int8_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The spec, the CPU path and the prefill path: dequantize (one fused pass), then one matrix
    product. Scaling the product's columns instead would be one pass less, but Inductor rewrites
    that form (convert, mm, multiply by the scales, in bf16) to aten._weight_int8pack_mm, whose
    AOTInductor CPU program crashed (torch 2.13, 2026-11-27) and whose CUDA kernel is slower than bf16
    (ANCHORS.md)."""
    y = F.linear(x, dequantize(qweight, scales.to(x.dtype)))
    return y + bias if bias is not None else y


with registering_triton_op():

    @triton_op("oiv2::linear_int8", mutates_args=())
    def linear_int8(
        x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if HAS_TRITON and x.device.type == "cuda" and takes(x, 8, 0):
            y = quant_matmul(x, qweight, scales, None, bits=8, group=0)
            return y + bias if bias is not None else y
        return linear_int8_ref(x, qweight, scales, bias)
