"""oiv2::linear_int8: y = x @ W^T (+ bias) with W stored as int8, one scale per output channel.

Layout ("int8-rowmajor-v1"): qweight [N, K] int8, row n holding output channel n, values in
[-127, 127]; scales [N] in the activation dtype; W[n, k] = qweight[n, k] * scales[n] (symmetric, no
zero point). `quantize` makes the layout from a float weight by rounding to nearest.

Layout "int8-tiles16x1024-v1" (`tile`; CUDA builds, passes/tile_int8_weights.py): the same values as
qweight [N/16, 16, K] (N a multiple of 16, K of 128), block b holding rows 16b.. in tiles of 1024 features:
tile j (features 1024j.., width w = min(1024, K - 1024j)) is 16 rows of w bytes, row r at r * w, and the
16-byte unit u of a row's slice sits at unit u ^ (r & 7). So the bytes a decode kernel streams, a stage
of 16 rows x 1024 features, lie together (one bulk copy, where 16 copies of 1 KB a row cost 141 us a step
of 32 llama-8b layers: benchmarks/RESULTS.md), and 8-byte loads of 8 rows from shared memory fall on
distinct banks. Every int8 kernel reads both layouts; the scales stay [N].

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
TILES_LAYOUT = "int8-tiles16x1024-v1"
QMAX = 127
TILE_ROWS = 16
TILE_FEATURES = 1024
UNIT = 16  # bytes a swizzled unit


def tiles_fit(n: int, k: int) -> bool:
    """Whether a weight [N, K] fits int8-tiles16x1024-v1."""
    return n % TILE_ROWS == 0 and k % 128 == 0 and n > 0 and k > 0


def _swizzle(rows: torch.Tensor) -> torch.Tensor:
    """rows [..., 16, W] (W a multiple of 128) with each row's 16-byte units at u ^ (r & 7); its own inverse."""
    *lead, r, w = rows.shape
    units = rows.reshape(*lead, r, w // UNIT, UNIT)
    u = torch.arange(w // UNIT, device=rows.device)
    order = u[None, :] ^ (torch.arange(r, device=rows.device)[:, None] & 7)  # [16, W/16]: unit u reads u ^ (r & 7)
    index = order.reshape(*([1] * len(lead)), r, w // UNIT, 1).expand(*lead, r, w // UNIT, UNIT)
    return torch.gather(units, -2, index).reshape(*lead, r, w)


def tile(qweight: torch.Tensor) -> torch.Tensor:
    """int8-rowmajor-v1 [N, K] → int8-tiles16x1024-v1 [N/16, 16, K]."""
    n, k = qweight.shape
    if not tiles_fit(n, k):
        raise ValueError(f"int8 tiles take N a multiple of 16 and K of 128, not {n} x {k}")
    blocks = qweight.reshape(n // TILE_ROWS, TILE_ROWS, k)
    parts = []
    for j in range(0, k, TILE_FEATURES):
        part = _swizzle(blocks[:, :, j : j + TILE_FEATURES])  # [N/16, 16, w]
        parts.append(part.reshape(n // TILE_ROWS, -1))
    return torch.cat(parts, dim=1).reshape(n // TILE_ROWS, TILE_ROWS, k)


def untile(tiles: torch.Tensor) -> torch.Tensor:
    """int8-tiles16x1024-v1 [N/16, 16, K] → int8-rowmajor-v1 [N, K]."""
    nb, r, k = tiles.shape
    flat = tiles.reshape(nb, r * k)
    parts = []
    for j in range(0, k, TILE_FEATURES):
        w = min(TILE_FEATURES, k - j)
        parts.append(_swizzle(flat[:, r * j : r * (j + w)].reshape(nb, r, w)))
    return torch.cat(parts, dim=2).reshape(nb * r, k)


def rows_of(qweight: torch.Tensor) -> int:
    """N of an int8 weight in either layout."""
    return qweight.shape[0] * qweight.shape[1] if qweight.dim() == 3 else qweight.shape[0]


def row_major(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [N, K] in int8-rowmajor-v1, whichever layout it comes in."""
    return untile(qweight) if qweight.dim() == 3 else qweight


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
