"""oiv2::rope_kv_write_attention against the two float64 oracles it composes (oiv2::rope_kv_write's
and oiv2::attention's), on fresh random inputs of several shapes, single pass and split.

The Triton kernels run on a GPU (the `cuda` tests) and in Triton's CPU interpreter (`interpreted`,
under TRITON_INTERPRET=1: `make test-interpret`).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from tests.kernels.test_attention import oracle as attention_oracle
from tests.kernels.test_rope_kv_write import oracle as rope_oracle

attention_mod = importlib.import_module("oiv2compile.kernels.attention")
HAS_TRITON = attention_mod.HAS_TRITON
INTERPRETED = HAS_TRITON and type(attention_mod._attention_kernel).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (make test-interpret)")

OP = torch.ops.oiv2.rope_kv_write_attention.default

# (batch, q heads, kv heads, head dim, cache length, start positions, splits): one new token each,
# at position start; splits 1 is the single pass, more the split kernel with chunk
# 64 * ceil(ceil(T / 64) / splits).
SHAPES = [
    (1, 32, 8, 64, 256, [100], 1),  # a llama-1b decode step
    (3, 4, 2, 16, 64, [5, 0, 63], 1),  # the first and the last position of the cache
    (2, 6, 3, 24, 50, [7, 40], 1),  # odd head size (BLOCK_D 32 > 24, half 12), group 2
    (2, 8, 2, 32, 300, [299, 130], 3),  # split (chunk 128): the new tokens in the third and second chunk
    (2, 16, 4, 128, 512, [64, 0], 8),  # split (chunk 64): new tokens on chunk boundaries, D = 128
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, device, seed, rotary):
    """rotary "ids": position ids of their own (3 past the cache positions, wrapping at T), so a
    kernel that rotated by the cache positions would fail; "cache": None, the cache positions."""
    B, Hq, Hkv, D, T, starts, _splits = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (Hq + 2 * Hkv) * D, generator=gen)
    angles = torch.randn(T, D // 2, generator=gen) * 3
    k_cache = torch.randn(B + 1, Hkv, T, D, generator=gen)
    v_cache = torch.randn(B + 1, Hkv, T, D, generator=gen)
    slots = torch.randperm(B + 1, generator=gen)[:B]
    position_ids = (torch.tensor(starts)[:, None] + 3) % T if rotary == "ids" else None
    qkv, cos, sin, k_cache, v_cache = (
        t.to(device=device, dtype=dtype) for t in (qkv, angles.cos(), angles.sin(), k_cache, v_cache)
    )
    positions = torch.tensor(starts, device=device)
    position_ids = position_ids.to(device) if position_ids is not None else None
    scale = 1 / math.sqrt(D)
    return qkv, cos, sin, position_ids, k_cache, v_cache, slots.to(device), positions, Hq, Hkv, scale


def _check(shape, dtype, device, call, rotary):
    args = _inputs(shape, dtype, device, seed=len(str(shape)), rotary=rotary)
    *rope_args, scale = args
    q, want_k, want_v = rope_oracle(*rope_args)
    slots, positions = args[6].cpu(), args[7].cpu()
    want = attention_oracle(q, want_k, want_v, slots, positions, scale)
    out = call(*args)
    assert out.shape == want.shape and out.dtype == dtype and out.device.type == device
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(args[4].double().cpu(), want_k, rtol=tol, atol=tol)
    torch.testing.assert_close(args[5].double().cpu(), want_v, rtol=tol, atol=tol)
    err = (out.double().cpu() - want).norm() / want.norm()
    assert err < tol, f"relative error {err:.2e}"


def _kernel(splits):
    """The decode kernels with `splits` programs per (sequence, kv head), launched directly."""

    def call(qkv, cos, sin, ids, k_cache, v_cache, slots, positions, num_heads, _num_kv_heads, scale):
        rope = attention_mod.RotaryToken(qkv, cos, sin, ids, num_heads)
        return attention_mod._attention_triton(None, k_cache, v_cache, slots, positions, scale, splits, rope)

    return call


ROTARY = ["ids", "cache"]


@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_oracles(shape, dtype, rotary):
    _check(shape, dtype, "cpu", OP, rotary)


@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device, rotary):
    args = _inputs(SHAPES[2], torch.float32, device, 0, rotary)
    torch.library.opcheck(OP, args)


def test_takes_one_new_token():
    args = list(_inputs(SHAPES[1], torch.float32, "cpu", 0, "cache"))
    args[0] = torch.cat([args[0], args[0]], dim=1)  # [B, 2, W]: two new tokens
    with pytest.raises(ValueError, match="one new token per sequence"):
        OP(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernels_match_oracles(shape, dtype, rotary):
    _check(shape, dtype, "cuda", _kernel(shape[6]), rotary)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_op_matches_rope_kv_write_then_attention(dtype):
    """The fused op against the two ops it replaces, as a decode step runs them (planned splits:
    a cache of 1024 splits), on the same inputs: caches equal, outputs within rounding."""
    shape = (2, 32, 8, 128, 1024, [700, 3], None)
    fused = _inputs(shape, dtype, "cuda", 1, "cache")
    apart = [a.clone() if isinstance(a, torch.Tensor) else a for a in fused]
    out = OP(*fused)
    *rope_args, scale = apart
    q = torch.ops.oiv2.rope_kv_write(*rope_args)
    want = torch.ops.oiv2.attention(q, apart[4], apart[5], apart[6], apart[7], scale)
    torch.testing.assert_close(fused[4], apart[4])
    torch.testing.assert_close(fused[5], apart[5])
    torch.testing.assert_close(out, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.fixture
def interpret_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch the interpreted kernels directly: wrap_triton wants a compiled JITFunction."""
    monkeypatch.setattr(attention_mod, "wrap_triton", lambda kernel: kernel)


@interpreted
@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_oracles_interpreted(shape, dtype, rotary, interpret_kernels):
    _check(shape, dtype, "cpu", _kernel(shape[6]), rotary)


@pytest.mark.cuda
def test_split_decode_aotinductor_cuda(tmp_path):
    """The op through AOTInductor with a dynamic batch over a long cache (the split kernel), writing
    the caches the caller passes, run at two batch sizes."""
    from oiv2compile import _torch_compat

    class Decode(torch.nn.Module):
        def forward(self, qkv, cos, sin, k, v, slots, positions):  # type: ignore[no-untyped-def]
            return torch.ops.oiv2.rope_kv_write_attention(qkv, cos, sin, None, k, v, slots, positions, 32, 8, 0.125)

    qkv, cos, sin, _ids, k, v, slots, positions, *_ = _inputs(
        (2, 32, 8, 128, 4096, [5, 3000], None), torch.bfloat16, "cuda", 0, "cache"
    )
    batch = torch.export.Dim("batch", min=1, max=8)
    exported = torch.export.export(
        Decode(),
        (qkv, cos, sin, k.clone(), v.clone(), slots, positions),
        dynamic_shapes=({0: batch}, None, None, None, None, {0: batch}, {0: batch}),
    )
    runner = _torch_compat.aoti_load_package(_torch_compat.aoti_compile_and_package(exported, tmp_path / "d.pt2", {}))
    for rows in (1, 2):
        k_run, v_run = k.clone(), v.clone()
        out = runner(qkv[:rows], cos, sin, k_run, v_run, slots[:rows], positions[:rows])
        q_want, k_want, v_want = rope_oracle(qkv[:rows], cos, sin, None, k, v, slots[:rows], positions[:rows], 32, 8)
        want = attention_oracle(q_want, k_want, v_want, slots[:rows].cpu(), positions[:rows].cpu(), 0.125)
        err = (out.double().cpu() - want).norm() / want.norm()
        assert err < 2e-2, f"relative error {err:.2e}"
        torch.testing.assert_close(k_run.double().cpu(), k_want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(v_run.double().cpu(), v_want, rtol=2e-2, atol=2e-2)
