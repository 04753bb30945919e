"""The Triton kernel behind oiv2::linear_int8 and oiv2::linear_int4 for decode-sized inputs on CUDA:
y = x @ W^T with W read as 8-bit or packed 4-bit integers and converted in registers, so the weights
cross memory once at their stored width.

Bytes first. With M rows of x, the product reads N * K weight bytes (int8) or N * K / 2 (int4) plus
the scales, for 2 * M * N * K FLOPs: up to a few dozen rows it is bound by memory, and the kernel's
job is to keep enough weight bytes in flight on every SM. Each program streams [BLOCK_N, BLOCK_K]
tiles of W through `num_stages` buffers, converts them to x's dtype (the integers are exact there)
and feeds a tensor-core `tl.dot` with a [BLOCK_M, BLOCK_K] tile of x; BLOCK_M = 16 wastes
tensor-core rows at M = 1, which costs nothing where memory is the bound.

int8 (one scale per output channel) keeps its scale out of the inner loop:
  y[m, n] = s[n] * sum_k x[m, k] q[n, k].
int4 (scale s and zero z per group g of input features, layout int4-grouphalves-v2): a group's
bytes hold its first half of features in the low nibbles and its second half in the high nibbles,
so a [BLOCK_N, BLOCK_K / 2] tile of bytes is two dot operands one masked shift apart. Each is
dequantized in registers, (q - z) * s with the group's scale and zero gathered per column, and a
step is two dots over BLOCK_K / 2 features whatever the group size. The 4-bit level v becomes a
float with integer operations alone: the 16-bit pattern MAGIC | v is MAGIC_VALUE + v in x's dtype
(bf16 0x4300 = 128, fp16 0x6400 = 1024), and MAGIC_VALUE folds into the zero point.

Measured on an H100 (copy 3.0 TB/s, 2026-11-27, bf16, M = 1, CUDA-graph replay, weights cycled past
L2): int8 4096 x 14336 at 77% of the copy bandwidth and 14336 x 4096 at 73-79% with BLOCK_N = 32 and
no split of K; splitting K over programs (float32 partial sums) lost on both, and converting int8
through two 4-bit halves (the int4 trick) lost to a plain conversion (45% against 60%). int4: the
interleaved v1 layout stayed near 30% whatever the tiling; v2 with one pair of small dots per group
and the scales applied to the dot results (a per-group correction with row sums of x) fell to
10-15% (tiling sweep, commit 0851b65): the small dots, not the bytes, were the bound. The one-tile
form with the scales and zeros gathered per column ran at 10-16% on an H200 (copy 4.2 TB/s, commit
5cb4135); loading them once per row and group (commit 4ca89f3) took it to 16-23% and the one-row
GEMV form to 18-25% (best tilings: 4096 x 14336 in 37.6 us, 14336 x 4096 in 29.5 us, against bf16
F.linear's 31.0 and 30.8 us). PyTorch's own tinygemm (aten._weight_int4pack_mm) ran the same
shapes in 16.5-16.9 us (41-42%) in the same session: the int4 form is not yet where it must be.

Prefill-sized inputs do not come here: a mixed-input Triton GEMM at M = 2048 took 2-5x the time of
bf16 cuBLAS, while dequantizing into bf16 (fused by Inductor) and cuBLAS costs one extra pass over
the weights. The ops' bodies route those to their reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.library import wrap_triton

from oiv2compile.kernels._triton import HAS_TRITON, tl, triton

# The 16-bit pattern of a value in each activation dtype whose mantissa's low 4 bits are free:
# (MAGIC | v) is exactly MAGIC_VALUE + v for v in 0..15.
MAGIC = {torch.bfloat16: 0x4300, torch.float16: 0x6400}
MAGIC_VALUE = {torch.bfloat16: 128.0, torch.float16: 1024.0}

# Tiles for a decode step whose batch is only known at run time (up to MAX_ROWS rows).
DECODE_ROWS = 16
# Above this many rows the kernel stops being bound by memory (its tiles recompute nothing, but each
# block of 16 rows reads the weights again): the reference's dequantize-then-GEMM wins.
MAX_ROWS = 64


@dataclass(frozen=True)
class Tiling:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    # One row of x (M = 1, fixed at compile time): multiply-adds on the CUDA cores and a sum over K
    # (_quant_gemv_kernel) instead of a tensor-core dot over 16 rows of which 15 are padding.
    gemv: bool = False


if HAS_TRITON:

    @triton.jit
    def _int8_rows(W, rn, rk, stride_wn, N: tl.constexpr, K: tl.constexpr, TILED: tl.constexpr):
        """Pointers [BLOCK_N, BLOCK_K] to int8 weights rn x rk: rows of int8-rowmajor-v1 (TILED 0), or
        int8-tiles16x1024-v2 (1; 2 paired; kernels/linear_int8.py): tile row r of block b, 16-byte unit
        u = (rk % 1024) / 16 at (u / 8) 2048 + ((u / 4) % 2) 1024 + (r / 8) 512 + (4 (r % 8) + u % 4) 16 of
        the block's tile rk / 1024."""
        if TILED:
            if TILED == 2:  # block b: the rows 8b.. and N/2 + 8b..
                up = (rn >= N // 2).to(tl.int32)
                m = rn - up * (N // 2)
                block = m // 8
                r = up * 8 + m % 8
            else:
                block = rn // 16
                r = rn % 16
            u = (rk % 1024) // 16
            k_offsets = 16 * (rk - rk % 1024) + (u // 8) * 2048 + ((u // 4) % 2) * 1024 + (u % 4) * 16 + rk % 16
            # Runs of 16 bytes from multiples of 16 (rk steps from a multiple of 16): said so, Triton loads a
            # unit at once; it cannot see it through the arithmetic, and loaded bytes one by one (an H200,
            # llama-8b gate/up at 16 rows: 172 us against 22 row-major, benchmarks/RESULTS.md).
            k_offsets = tl.max_contiguous(tl.multiple_of(k_offsets, 16), 16)
            return (
                W
                + block[:, None].to(tl.int64) * (16 * K)
                + k_offsets[None, :]
                + ((r // 8) * 512 + (r % 8) * 64)[:, None]
            )
        return W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]

    @triton.jit
    def _quant_matmul_kernel(
        X,
        W,
        Scales,
        Zeros,
        Out,
        M,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_zn,
        stride_os,
        stride_om,
        N: tl.constexpr,
        K: tl.constexpr,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        IEEE: tl.constexpr,
        MAGIC: tl.constexpr,
        MAGIC_VALUE: tl.constexpr,
        TILED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        # Programs that share a weight tile (one per block of rows) run next to each other, so the
        # second read of a tile comes from L2.
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_valid = rm < M
        n_valid = rn < N
        rn_safe = tl.where(n_valid, rn, 0)  # rows past N read row 0 and are never stored
        k_len: tl.constexpr = K // SPLIT_K
        k_start = pid_k * k_len
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_rows = X + rm[:, None].to(tl.int64) * stride_xm
        HALF: tl.constexpr = GROUP // 2
        GROUPS: tl.constexpr = BLOCK_K // GROUP  # whole int4 groups per step
        c_half = tl.arange(0, BLOCK_K // 2)
        c_group = c_half // HALF
        c_in_group = c_half % HALF
        r_g = tl.arange(0, GROUPS)
        # [BLOCK_N, GROUPS, HALF] bytes of a step: group g's j-th byte at g * HALF + j of the step's.
        w_bytes = (
            W
            + rn_safe[:, None, None].to(tl.int64) * stride_wn
            + (r_g[:, None] * HALF + tl.arange(0, HALF)[None, :])[None, :, :]
        )
        for k_step in range(0, k_len, BLOCK_K):
            k0 = k_start + k_step
            if BITS == 8:
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + rk[None, :], mask=m_valid[:, None], other=0.0)
                q = tl.load(_int8_rows(W, rn_safe, rk, stride_wn, N, K, TILED)).to(x.dtype)
                if IEEE:
                    acc += tl.dot(x, tl.trans(q), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(q))
            else:
                # A step covers GROUPS whole groups: bytes [BLOCK_N, GROUPS, HALF], byte j of group g
                # holding feature g * GROUP + j in its low nibble and that plus HALF in its high one.
                # Both halves are dequantized in registers with their group's scale and zero point
                # (loaded once per row and group, broadcast over the group's bytes), flattened to
                # [BLOCK_N, BLOCK_K / 2] and fed to two dots: two large dots whatever the group size.
                packed = tl.load(w_bytes + k0 // 2)
                k_lo = k0 + c_group * GROUP + c_in_group  # column c of the flattened tile
                x_lo = tl.load(x_rows + k_lo[None, :], mask=m_valid[:, None], other=0.0)
                x_hi = tl.load(x_rows + (k_lo + HALF)[None, :], mask=m_valid[:, None], other=0.0)
                g = k0 // GROUP + r_g
                s = tl.load(Scales + rn_safe[:, None] * stride_sn + g[None, :])[:, :, None]
                z = tl.load(Zeros + rn_safe[:, None] * stride_zn + g[None, :])[:, :, None]
                if IEEE:
                    s = s.to(tl.float32)
                    z = z.to(tl.float32)
                    lo = ((packed & 0xF).to(tl.float32) - z) * s
                    hi = ((packed >> 4).to(tl.float32) - z) * s
                    lo = tl.reshape(lo, (BLOCK_N, BLOCK_K // 2))
                    hi = tl.reshape(hi, (BLOCK_N, BLOCK_K // 2))
                    acc += tl.dot(x_lo, tl.trans(lo), input_precision="ieee")
                    acc += tl.dot(x_hi, tl.trans(hi), input_precision="ieee")
                else:
                    # (MAGIC | level) is MAGIC_VALUE + level in x's dtype; both differences are exact
                    # there, so (q - z) * s rounds once, as the reference's dequantize does.
                    p16 = packed.to(tl.uint16)
                    z = z.to(x_lo.dtype) + MAGIC_VALUE
                    s = s.to(x_lo.dtype)
                    lo = (((p16 & 0xF) | MAGIC).to(x_lo.dtype, bitcast=True) - z) * s
                    hi = (((p16 >> 4) | MAGIC).to(x_lo.dtype, bitcast=True) - z) * s
                    lo = tl.reshape(lo.to(x_lo.dtype), (BLOCK_N, BLOCK_K // 2))
                    hi = tl.reshape(hi.to(x_lo.dtype), (BLOCK_N, BLOCK_K // 2))
                    acc += tl.dot(x_lo, tl.trans(lo))
                    acc += tl.dot(x_hi, tl.trans(hi))
        if BITS == 8:
            acc *= tl.load(Scales + rn_safe).to(tl.float32)[None, :]
        out = Out + pid_k * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out, acc.to(Out.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


if HAS_TRITON:

    @triton.jit
    def _quant_gemv_kernel(
        X,
        W,
        Scales,
        Zeros,
        Out,
        stride_wn,
        stride_sn,
        stride_zn,
        stride_os,
        N: tl.constexpr,
        K: tl.constexpr,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        TILED: tl.constexpr,
    ):
        """y[n] = sum_k x[k] W[n, k] for one row of x: each program streams [BLOCK_N, BLOCK_K] tiles
        of W (int4: [BLOCK_N, BLOCK_K / 2] bytes, both nibbles used, as in _quant_matmul_kernel),
        converts them to float32 and reduces over K in registers. float32 throughout, so it does not
        round the dequantized weight to x's dtype as the reference does: differences of that size."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = rn < N
        rn_safe = tl.where(n_valid, rn, 0)
        k_len: tl.constexpr = K // SPLIT_K
        k_start = pid_k * k_len
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        HALF: tl.constexpr = GROUP // 2
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        r_g = tl.arange(0, GROUPS)
        in_step = r_g[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [GROUPS, HALF]: byte of group g
        w_bytes = W + rn_safe[:, None, None].to(tl.int64) * stride_wn + in_step[None, :, :]
        feature = r_g[:, None] * GROUP + tl.arange(0, HALF)[None, :]  # its low nibble's feature
        for k_step in range(0, k_len, BLOCK_K):
            k0 = k_start + k_step
            if BITS == 8:
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + rk).to(tl.float32)
                q = tl.load(_int8_rows(W, rn_safe, rk, stride_wn, N, K, TILED)).to(tl.float32)
                acc += tl.sum(q * x[None, :], axis=1)
            else:
                # sum_k x[k] (q[n, k] - z[n, g]) s[n, g] = sum_g s[n, g] (sum_j x q - z[n, g] sum_j x):
                # the integers meet x first, the group's scale and zero point once per group.
                packed = tl.load(w_bytes + k0 // 2)  # [BLOCK_N, GROUPS, HALF]
                x_lo = tl.load(X + k0 + feature).to(tl.float32)  # [GROUPS, HALF]
                x_hi = tl.load(X + k0 + feature + HALF).to(tl.float32)
                qx = tl.sum(
                    (packed & 0xF).to(tl.float32) * x_lo[None] + (packed >> 4).to(tl.float32) * x_hi[None], axis=2
                )
                x_sum = tl.sum(x_lo + x_hi, axis=1)  # [GROUPS]
                g = k0 // GROUP + r_g
                s = tl.load(Scales + rn_safe[:, None] * stride_sn + g[None, :]).to(tl.float32)  # [BLOCK_N, GROUPS]
                z = tl.load(Zeros + rn_safe[:, None] * stride_zn + g[None, :]).to(tl.float32)
                acc += tl.sum(s * (qx - z * x_sum[None, :]), axis=1)
        if BITS == 8:
            acc *= tl.load(Scales + rn_safe).to(tl.float32)
        tl.store(Out + pid_k * stride_os + rn, acc.to(Out.dtype.element_ty), mask=n_valid)


def choose_tiling(m: int, n: int, k: int, bits: int, group: int, sm_count: int) -> Tiling:
    """Tiles for `m` rows (at most MAX_ROWS; DECODE_ROWS where the batch is dynamic), from sizes
    fixed when the graph is compiled."""
    if bits == 4 and m == 1:
        # One row: the GEMV form with its K halved over two programs won on both swept shapes (H200,
        # 2026-11-27: 4096 x 14336 in 40.3 us against 45.6 for the dot form's default, 14336 x 4096
        # in 29.5 against 41.9). A step of 256 features holds whole groups (32, 64 or 128).
        block_k = 256
        while k % block_k:
            block_k //= 2
        return Tiling(1, 32, block_k, 2 if k % (2 * block_k) == 0 else 1, num_warps=8, num_stages=2, gemv=True)
    block_n = 32
    split_k = 1
    programs = -(-m // 16) * -(-n // block_n)
    # 512 features per step (a power of two for the kernel's ranges) or the largest power of two that
    # divides K: int4 groups are powers of two that divide K, so a step always holds whole groups.
    # int8 with two to eight waves of column tiles takes 128: several programs then fit on an SM
    # (a 512-wide step and its 4 stages take 128 KB of shared memory, one program per SM). Tiling
    # sweep on an H100 (2026-11-27): 14336 x 4096 at M = 1 in 24.9 us against 26.8 us, at M = 16 in
    # 25.3 against 29.0; with one wave (4096 x 14336, 4096 x 4096) 512 won (25.5 against 37.3 us).
    block_k = 128 if bits == 8 and 2 * sm_count <= programs < 8 * sm_count else 512
    while k % block_k:
        block_k //= 2
    # Split K only where the column tiles alone would leave most SMs idle (the k/v projections):
    # the partial sums cost a float32 round trip that lost wherever the SMs were already busy.
    while programs * split_k < sm_count // 2 and k % (2 * split_k * block_k) == 0:
        split_k *= 2
    return Tiling(16, block_n, block_k, split_k, num_warps=4, num_stages=4)


def takes(x: torch.Tensor, bits: int, group: int) -> bool:
    """Whether the kernel takes x [..., K]: decode-sized rows (a fixed count up to MAX_ROWS, or a
    dynamic batch of one token each) and K in whole tiles; False sends the op to its reference."""
    rows = rows_hint(x)
    k = x.shape[-1]
    if rows is None or rows > MAX_ROWS or not isinstance(k, int):
        return False
    if bits == 4:
        return group in (32, 64, 128) and k % group == 0
    return k % 16 == 0


def rows_hint(x: torch.Tensor) -> int | None:
    """The number of rows of x [..., K] where the graph fixes it; DECODE_ROWS where only the batch is
    dynamic and each sequence brings one token (a decode step); None where it may be a prefill.
    Sizes may be symbolic when an artifact is traced: branch only on ints, so no guard is added."""
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    if isinstance(rows, int):
        return rows
    if x.dim() >= 3 and isinstance(x.shape[-2], int) and x.shape[-2] == 1:
        return DECODE_ROWS
    return None


def quant_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int,
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """x [..., K] times the quantized weight, transposed: [..., N] in x's dtype. The caller checks
    `takes(x, bits, group)` first."""
    k = x.shape[-1]
    # int8-tiles16x1024-v2: 1, its paired form 2 (kernels/linear_int8.py)
    tiled = weight.dim() - 2 if bits == 8 and weight.dim() > 2 else 0
    n = weight.numel() // k if bits == 8 else weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if tiling is None:
        rows = rows_hint(x)
        if rows is None:
            raise ValueError("quant_matmul takes decode-sized inputs; check takes() first")
        tiling = choose_tiling(rows, n, k, bits, group, _sm_count(x.device))
    out_dtype = torch.float32 if tiling.split_k > 1 else x.dtype
    out = torch.empty((tiling.split_k, m, n), dtype=out_dtype, device=x.device)
    zeros = scales if zeros is None else zeros  # int8 has none: any valid tensor stands in
    group = group if bits == 4 else 2  # int8 has no groups; 2 keeps the unused int4 ranges valid
    # What both kernels take alike.
    sizes = dict(N=n, K=k, BITS=bits, GROUP=group, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k, TILED=tiled)
    launch = dict(SPLIT_K=tiling.split_k, num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if tiling.gemv:
        if not (isinstance(m, int) and m == 1):
            raise ValueError(f"the GEMV tiling takes one row of x, not {m}")
        wrap_triton(_quant_gemv_kernel)[(triton.cdiv(n, tiling.block_n), tiling.split_k)](
            x2,
            weight,
            scales,
            zeros,
            out,
            weight.stride(0),
            scales.stride(0),
            zeros.stride(0),
            out.stride(0),
            **sizes,
            **launch,
        )
    else:
        grid = (triton.cdiv(m, tiling.block_m) * triton.cdiv(n, tiling.block_n), tiling.split_k)
        wrap_triton(_quant_matmul_kernel)[grid](
            x2,
            weight,
            scales,
            zeros,
            out,
            m,
            x2.stride(0),
            weight.stride(0),
            scales.stride(0),
            zeros.stride(0),
            out.stride(0),
            out.stride(1),
            **sizes,
            **launch,
            BLOCK_M=tiling.block_m,
            IEEE=x.dtype == torch.float32,
            MAGIC=MAGIC.get(x.dtype, 0),
            MAGIC_VALUE=MAGIC_VALUE.get(x.dtype, 0.0),
        )
    # The float32 partial sums of a split K: their sum and cast fuse into whatever reads y.
    y = out[0] if tiling.split_k == 1 else out.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
