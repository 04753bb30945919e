"""int8-tiles16x1024-v2 and its paired form (kernels/linear_int8.py): tile and untile invert each other, every
byte sits where the kernels look for it, the references read every layout alike, and on CUDA every int8 kernel
gives the same bits from the tiles as from the row-major weights (the arithmetic does not change, only the
addresses)."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.kernels.gated_act import ACTIVATIONS
from oiv2compile.kernels.linear_int8 import linear_int8_ref, row_major, rows_of, tile, tiles_fit, untile

# (N, K): one tile, tiles and a last one of 128 features, a last one of 896, llama-8b's down.
SHAPES = [(16, 128), (48, 2176), (32, 1920), (4096, 14336)]
SMALL_SHAPES = SHAPES[:3]


def _q(n: int, k: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(device)


def _offset(n: int, k: int, K: int, pair_width: int) -> int:
    """Where weight (n, k) sits in the tiles, as the kernels' tiled_offset / _int8_rows work it out."""
    if pair_width:
        up = int(n >= pair_width)
        block, r = (n - up * pair_width) // 8, 8 * up + (n - up * pair_width) % 8
    else:
        block, r = n // 16, n % 16
    u = (k % 1024) // 16
    return (
        block * 16 * K
        + 16 * (k // 1024 * 1024)
        + (u // 8) * 2048
        + (u // 4) % 2 * 1024
        + (r // 8) * 512
        + (4 * (r % 8) + u % 4) * 16
        + k % 16
    )


@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
@pytest.mark.parametrize("n,k", SMALL_SHAPES)
def test_tile_and_untile_invert_each_other_and_put_each_byte_where_the_kernels_read_it(n, k, paired):
    q = _q(n, k)
    tiles = tile(q, paired)
    assert tiles.shape == ((n // 16, 2, 8, k) if paired else (n // 16, 16, k)) and tiles.dtype == torch.int8
    assert torch.equal(untile(tiles), q) and torch.equal(row_major(tiles), q) and row_major(q) is q
    assert rows_of(tiles) == rows_of(q) == n
    flat = tiles.reshape(-1)
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    pair_width = n // 2 if paired else 0
    where = torch.tensor(
        [_offset(int(r), int(c), k, pair_width) for r, c in zip(rows.flatten(), cols.flatten(), strict=True)]
    )
    assert torch.equal(flat[where].reshape(n, k), q)
    assert sorted(where.tolist()) == list(range(n * k))  # a permutation: every byte once
    # Every 16 features from a multiple of 16 are 16 bytes in a row from a multiple of 16: the kernels' 16-byte
    # loads and copies, and what the Triton op tells Triton (_int8_rows).
    units = where.reshape(n, k // 16, 16)
    assert bool((units[..., 0] % 16 == 0).all()) and bool((units - units[..., :1] == torch.arange(16)).all())


@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
def test_a_stage_of_16_rows_lies_together_and_a_warps_fragments_are_512_contiguous_bytes(paired):
    """Block b's stage of features f0.. is bytes [16 (b K + f0), + 16 w) of the tiles, w its width (paired: the
    gate rows 8b.. and the up rows N/2 + 8b..); in it, consumer warp s's 128 features are 2048 bytes from
    2048 s, lane L's 16 bytes of each of its four loads at 512 j + 16 L: row (L / 4) + 8 (j % 2), features
    64 (j / 2) + 16 (L % 4).. of the slice."""
    n, k = 32, 2176
    q = _q(n, k)
    flat = tile(q, paired).reshape(-1)
    for b in range(n // 16):
        rows = (
            torch.cat([q[8 * b : 8 * b + 8], q[n // 2 + 8 * b : n // 2 + 8 * b + 8]])
            if paired
            else q[16 * b : 16 * b + 16]
        )
        for f0 in range(0, k, 1024):
            w = min(1024, k - f0)
            stage = flat[16 * (b * k + f0) : 16 * (b * k + f0) + 16 * w]
            for s in range(w // 128):
                for j in range(4):
                    for lane in range(32):
                        at = 2048 * s + 512 * j + 16 * lane
                        f = f0 + 128 * s + 64 * (j // 2) + 16 * (lane % 4)
                        assert torch.equal(stage[at : at + 16], rows[lane // 4 + 8 * (j % 2), f : f + 16])


def test_which_shapes_fit():
    assert tiles_fit(16, 128) and tiles_fit(4096, 14336) and tiles_fit(128256, 4096)
    assert not tiles_fit(259, 128) and not tiles_fit(16, 64) and not tiles_fit(16, 1088)
    with pytest.raises(ValueError, match="multiple of 16"):
        tile(_q(8, 128))


@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
@pytest.mark.parametrize("n,k", SMALL_SHAPES)
def test_the_references_read_every_layout_alike(n, k, paired):
    ops = torch.ops.oiv2
    q = _q(n, k)
    tiles = tile(q, paired)
    scales = torch.rand(n, dtype=torch.bfloat16) * 1e-2
    x = torch.randn(2, k, dtype=torch.bfloat16)
    residual = torch.randn(2, n, dtype=torch.bfloat16)
    assert torch.equal(linear_int8_ref(x, tiles, scales), linear_int8_ref(x, q, scales))
    pairs = [
        (ops.linear_int8, (scales,)),
        (ops.linear_int8_gemm, (scales,)),
        (ops.linear_int8_gemv, (scales,)),
        (ops.linear_int8_gemv_add, (scales, residual)),
        (ops.rms_norm_linear_int8_gemv, (scales, 1e-5)),
        (ops.rms_norm_linear_int8_gemv_gated_act, (scales, 1e-5, ACTIVATIONS.index("silu"))),
    ]
    for op, rest in pairs:
        want, got = op(x, q, *rest), op(x, tiles, *rest)
        assert got.shape == want.shape and torch.equal(got, want), op


def _cuda_ops():  # type: ignore[no-untyped-def]
    from oiv2compile.kernels import linear_int8_gemm, linear_int8_gemv

    linear_int8_gemv.load_extension()
    linear_int8_gemm.load_extension()
    return torch.ops.oiv2


@pytest.mark.cuda
@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_the_one_row_products_give_the_same_bits_from_the_tiles(n, k, dtype, paired):
    """The streamed kernel at one row (one copy a stage; the gated product on plain tiles through the register
    kernel), the register kernel at 2-4 rows."""
    ops = _cuda_ops()
    q = _q(n, k, seed=1, device="cuda")
    tiles = tile(q, paired)
    scales = (torch.rand(n, device="cuda") * 1e-2).to(dtype)
    for rows in (1, 2, 4):
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        residual = torch.randn(rows, n, device="cuda", dtype=dtype)
        for op, rest in [
            (ops.linear_int8_gemv, (scales,)),
            (ops.linear_int8_gemv_add, (scales, residual)),
            (ops.rms_norm_linear_int8_gemv, (scales, 1e-5)),
            (ops.rms_norm_linear_int8_gemv_gated_act, (scales, 1e-5, ACTIVATIONS.index("silu"))),
        ]:
            want, got = op(x, q, *rest), op(x, tiles, *rest)
            if rows == 1 and op is ops.rms_norm_linear_int8_gemv_gated_act and not paired:
                # Plain tiles do not hold a gated block together: the register kernel, other sums.
                assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
            else:
                assert torch.equal(got, want), (op, rows)
        if rows == 1:
            want = linear_int8_ref(x.float(), q, scales.float())
            got = ops.linear_int8_gemv(x, tiles, scales).float()
            assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 16, 130, 300])
@pytest.mark.parametrize("n,k", SHAPES[:3])
def test_the_prefill_gemm_gives_the_same_bits_from_the_tiles(n, k, rows, dtype):
    """wgmma up to 256 rows, the dequantizing path above (300)."""
    ops = _cuda_ops()
    q = _q(n, k, seed=2, device="cuda")
    scales = (torch.rand(n, device="cuda") * 1e-2).to(dtype)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    want = ops.linear_int8_gemm(x, q, scales)
    assert torch.equal(ops.linear_int8_gemm(x, tile(q), scales), want)
    assert torch.equal(ops.linear_int8_gemm(x, tile(q, paired=True), scales), want)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 2, 8, 16])
@pytest.mark.parametrize("n,k", SHAPES[:3])
def test_the_triton_op_gives_the_same_bits_from_the_tiles(n, k, rows):
    """oiv2::linear_int8 at decode sizes: the Triton kernel (one row takes the GEMV tiling)."""
    q = _q(n, k, seed=3, device="cuda")
    scales = (torch.rand(n, device="cuda") * 1e-2).to(torch.bfloat16)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    want = torch.ops.oiv2.linear_int8(x, q, scales)
    assert torch.equal(torch.ops.oiv2.linear_int8(x, tile(q), scales), want)
    assert torch.equal(torch.ops.oiv2.linear_int8(x, tile(q, paired=True), scales), want)
