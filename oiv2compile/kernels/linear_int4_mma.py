"""oiv2::linear_int4_mma: y = x @ W^T for x [..., K] in bf16 or fp16 with W in the 4-bit layout
"int4-mma16x64-v1", by a hand-written CUDA C++ kernel on the tensor cores (csrc/linear_int4_mma.cu).

Layout. The levels q [N, K] (values 0..15) and the (scale, zero) of each group of G input features
(G = 32, 64 or 128; N a multiple of 16, K of 64) are packed at build time so that one 16-byte load
of a lane is its A fragments of four mma.m16n8k16 steps:
- packed [N, K/2] uint8 is the words [N/16, K/64, 32, 4] (uint32, little-endian): block b of 16 rows,
  chunk c of 64 features, lane l = 4 * g + t, step j. Nibble p of a word (bits 4p..4p+3) holds
      q[16 b + g + 8 * (p & 1), 64 c + 32 * (j >> 1) + 8 t + 4 * (j & 1) + 2 * ((p >> 1) & 1) + (p >> 2)]
  so nibbles r and r + 4 (r = 0..3) are the fragment pair a[r] of the m16n8k16 A operand, the mma's
  k order being a permutation of the chunk's features that x's loads follow (8 contiguous features a
  lane, one 16-byte load for two steps).
- scale_zero [N/16, K/G, 16, 2] in the activation dtype: block, group, row within the block,
  (scale, zero); zeros are whole numbers in 0..15. W[n, k] = (q - zero) * scale, as in
  oiv2::linear_int4 (whose layout, int4-grouphalves-v2, the build repacks into this one).

On CUDA the op is the C++ library (registered for the CUDA key when `load_extension()` or an artifact
loads it): up to 32 rows of x go through the tensor-core kernel, which streams the weights once; 33 to
256 rows, on Hopper, through a mixed-input GEMM on the warpgroup tensor cores (wgmma, csrc/wgmma_gemm.cuh),
which reads the packed weights once per 128 rows of x; more rows (or another card) dequantize slices of
W that L2 holds and multiply them with cuBLAS. On the CPU the op is its reference: unpack, dequantize,
one matrix product.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from oiv2compile.kernels import _cuda_extension
from oiv2compile.kernels.linear_int4 import dequantize_levels

LAYOUT = "int4-mma16x64-v1"
SOURCE = _cuda_extension.CSRC / "linear_int4_mma.cu"
BLOCK_ROWS = 16
CHUNK = 64
GROUPS = (32, 64, 128)

# q [N, K] viewed as (block, row >= 8, g, chunk, half, t, step & 1, h, e) and permuted to the order
# of the packed words: (block, chunk, g, t, half, step & 1 | within the word: e, h, row >= 8).
_TO_WORDS = (0, 3, 2, 5, 4, 6, 8, 7, 1)
_FROM_WORDS = tuple(sorted(range(9), key=_TO_WORDS.__getitem__))

_lib = torch.library.Library("oiv2", "FRAGMENT")
_lib.define("linear_int4_mma(Tensor x, Tensor packed, Tensor scale_zero) -> Tensor")


def takes(n: int, k: int, group: int) -> bool:
    """Whether a weight [N, K] with groups of `group` features fits the layout."""
    return n % BLOCK_ROWS == 0 and k % CHUNK == 0 and group in GROUPS


def pack(q: torch.Tensor) -> torch.Tensor:
    """Levels [N, K] in 0..15 → packed [N, K/2] uint8 in int4-mma16x64-v1."""
    n, k = q.shape
    nibbles = q.to(torch.uint8).reshape(n // BLOCK_ROWS, 2, 8, k // CHUNK, 2, 4, 2, 2, 2).permute(_TO_WORDS)
    nibbles = nibbles.reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).reshape(n, k // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Packed [N, K/2] uint8 in int4-mma16x64-v1 → levels [N, K] uint8."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    permuted = nibbles.reshape(n // BLOCK_ROWS, k // CHUNK, 8, 4, 2, 2, 2, 2, 2)
    return permuted.permute(_FROM_WORDS).reshape(n, k)


def scale_zero(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Scales and zeros [N, K/G] → scale_zero [N/16, K/G, 16, 2]."""
    n, groups = scales.shape
    pairs = torch.stack((scales, zeros.to(scales.dtype)), dim=-1).reshape(n // BLOCK_ROWS, BLOCK_ROWS, groups, 2)
    return pairs.transpose(1, 2).contiguous()


def split_scale_zero(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale_zero [N/16, K/G, 16, 2] → (scales, zeros), each [N, K/G]."""
    blocks, groups = pairs.shape[:2]
    by_row = pairs.transpose(1, 2).reshape(blocks * BLOCK_ROWS, groups, 2)
    return by_row[..., 0], by_row[..., 1]


def dequantize(packed: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] (in scale_zero's dtype) that the layout stands for."""
    scales, zeros = split_scale_zero(pairs)
    return dequantize_levels(unpack(packed), scales, zeros)


def linear_int4_mma_ref(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The spec: x [..., K], packed [N, K/2] uint8, scale_zero [N/16, K/G, 16, 2] → [..., N] in x's dtype."""
    return F.linear(x, dequantize(packed, pairs.to(x.dtype)))


_lib.impl("linear_int4_mma", linear_int4_mma_ref, "CPU")


@torch.library.register_fake("oiv2::linear_int4_mma")
def _linear_int4_mma_fake(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def load_extension(build_dir: Path | None = None) -> Path:
    """Compile (once per source and torch version) and load the CUDA kernel; returns the library."""
    return _cuda_extension.load(SOURCE, build_dir)
