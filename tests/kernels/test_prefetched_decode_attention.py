"""oiv2::prefetched_decode_attention (the C++ kernel) against the float64 oracles of oiv2::rope_kv_write and
oiv2::attention, on fresh random inputs: odd fill lengths around the 16-position tiles, the first and last
position of the cache, a position past it, groups 1 to 8, D 64 and 128, bf16 and fp16, rotary tables in
float32 and in the activations' dtype; after a C++ product that lets it launch early; replayed from a
CUDA graph with new positions. On the CPU the op runs its reference; opcheck checks the schema and fake."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.kernels import prefetched_decode_attention as mod
from tests.kernels import test_rope_kv_write_attention as triton_test
from tests.kernels.test_attention import oracle as attention_oracle
from tests.kernels.test_rope_kv_write import oracle as rope_oracle

OP = torch.ops.oiv2.prefetched_decode_attention.default
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (batch, q heads, kv heads, head dim, cache length, start positions): one new token a sequence at its start.
SHAPES = [
    (1, 32, 8, 128, 256, [192]),  # a llama-8b decode step
    (1, 32, 8, 64, 256, [129]),  # llama-1b heads
    (3, 8, 8, 128, 64, [0, 1, 63]),  # group 1; the first and the last position of the cache
    (4, 16, 2, 64, 100, [15, 16, 17, 99]),  # group 8; around a tile's end; T not a multiple of 16
    (2, 12, 4, 128, 256, [255, 100]),  # group 3
    (2, 8, 2, 64, 48, [48, 47]),  # a position past the cache: attention over the cache alone, nothing written
]


@pytest.fixture(scope="module")
def library() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mod.load_extension()


def _inputs(shape, dtype, seed, rotary, table_dtype):
    """The Triton op's test inputs on the GPU, with the rotary tables in table_dtype (None: dtype)."""
    args = list(triton_test._inputs((*shape, 1), dtype, "cuda", seed, rotary))
    if table_dtype is not None:
        args[1], args[2] = args[1].to(table_dtype), args[2].to(table_dtype)
    return tuple(args)


def _want(args):
    """The oracles' output and caches (float64, on the CPU) for these inputs, taken before the call."""
    *rope_args, scale = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    q, k_cache, v_cache = rope_oracle(*rope_args)
    return attention_oracle(q, k_cache, v_cache, rope_args[6], rope_args[7], scale), k_cache, v_cache


def _assert_matches(out, k_cache, v_cache, want, dtype):
    want_out, want_k, want_v = want
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == want_out.shape
    torch.testing.assert_close(k_cache.double().cpu(), want_k, rtol=tol, atol=tol)
    torch.testing.assert_close(v_cache.double().cpu(), want_v, rtol=tol, atol=tol)
    err = (out.double().cpu() - want_out).norm() / want_out.norm()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("table_dtype", [None, torch.float32])
@pytest.mark.parametrize("rotary", ["ids", "cache"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_matches_oracles(library, shape, dtype, rotary, table_dtype):
    args = _inputs(shape, dtype, len(str(shape)), rotary, table_dtype)
    want = _want(args)
    out = OP(*args)
    _assert_matches(out, args[4], args[5], want, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_the_triton_op(library, dtype):
    """The same inputs through oiv2::rope_kv_write_attention: caches equal, outputs within rounding."""
    args = _inputs(SHAPES[0], dtype, 1, "cache", None)
    other = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = OP(*args)
    want = torch.ops.oiv2.rope_kv_write_attention(*other)
    torch.testing.assert_close(args[4], other[4])
    torch.testing.assert_close(args[5], other[5])
    torch.testing.assert_close(out, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.cuda
def test_cuda_kernel_after_a_product_that_launches_it_early(library):
    """qkv made by the C++ int8 GEMV, which lets the next kernel launch as it starts: the attention copies
    the cache before the product ends and must still read the product's row, not what was there before."""
    from oiv2compile.kernels import linear_int8_gemv

    linear_int8_gemv.load_extension()
    shape = SHAPES[0]
    B, Hq, Hkv, D, _T, _starts = shape
    args = list(_inputs(shape, torch.bfloat16, 2, "cache", None))
    gen = torch.Generator().manual_seed(3)
    K = 4096
    x = torch.randn(1, K, generator=gen).to("cuda", torch.bfloat16)
    qweight = torch.randint(-127, 128, ((Hq + 2 * Hkv) * D, K), generator=gen, dtype=torch.int8).cuda()
    scales = (torch.rand((Hq + 2 * Hkv) * D, generator=gen) / 2000).to("cuda", torch.bfloat16)
    want_args = list(args)
    want_args[0] = torch.ops.oiv2.linear_int8_gemv(x, qweight, scales).view(B, 1, -1)
    want = _want(want_args)
    qkv = torch.ops.oiv2.linear_int8_gemv(x, qweight, scales).view(B, 1, -1)  # launched right before the op
    out = OP(qkv, *args[1:])
    _assert_matches(out, args[4], args[5], want, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_graph_replays_with_new_positions(library):
    """Captured once, replayed at other positions and slots: each replay matches the oracles."""
    shape = (2, 32, 8, 128, 256, [10, 200])
    args = list(_inputs(shape, torch.bfloat16, 4, "cache", None))
    OP(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])  # loads the module before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(*args)
    for starts, slots in (([0, 255], [1, 0]), ([131, 64], [2, 1])):
        args[7].copy_(torch.tensor(starts))
        args[6].copy_(torch.tensor(slots))
        want = _want(args)
        graph.replay()
        _assert_matches(out, args[4], args[5], want, torch.bfloat16)


def test_cpu_runs_the_reference_and_opcheck():
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, T = 2, 4, 2, 16, 8
    args = (
        torch.randn(B, 1, (Hq + 2 * Hkv) * D, generator=gen),
        torch.randn(T, D // 2, generator=gen),
        torch.randn(T, D // 2, generator=gen),
        None,
        torch.randn(B, Hkv, T, D, generator=gen),
        torch.randn(B, Hkv, T, D, generator=gen),
        torch.tensor([1, 0]),
        torch.tensor([3, 7]),
        Hq,
        Hkv,
        0.25,
    )
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = OP(*args)
    want = torch.ops.oiv2.rope_kv_write_attention(*copies)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(args[4], copies[4], rtol=0, atol=0)
    torch.library.opcheck(OP, args)


def test_takes():
    qkv = torch.empty(1, 1, 48 * 128, dtype=torch.bfloat16)
    table = torch.empty(256, 64)
    cache = torch.empty(2, 8, 256, 128, dtype=torch.bfloat16)
    assert mod.takes(qkv, table, cache, 32, 8)
    assert not mod.takes(qkv, table, torch.empty(2, 8, 512, 128, dtype=torch.bfloat16), 32, 8)  # a longer cache
    assert not mod.takes(qkv.float(), table, cache.float(), 32, 8)  # float32 activations
    assert not mod.takes(qkv, table, cache, 32, 2)  # 16 query heads a kv head
    assert not mod.takes(torch.empty(1, 1, 48 * 96, dtype=torch.bfloat16), table, cache[..., :96], 32, 8)  # D 96
    assert not mod.takes(torch.empty(1, 2, 48 * 128, dtype=torch.bfloat16), table, cache, 32, 8)  # two tokens
