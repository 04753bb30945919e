"""oiv2::add_rms_norm against Hugging Face's residual add and RMSNorm, and against its reference, on
fresh random inputs of several shapes, odd sizes included."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from oiv2compile.kernels.add_rms_norm import add_rms_norm_ref

SHAPES = [(1, 1, 16), (3, 1, 64), (2, 7, 96), (4, 5, 1001)]  # [B, S, N]
EPS = (1e-5, 1e-6)


def _inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(device=device, dtype=dtype)
    return x, residual, weight


def _hf(x, residual, weight, eps):
    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        hidden = residual + x
        return norm(hidden), hidden


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_hf_add_and_rms_norm(shape, dtype, eps):
    x, residual, weight = _inputs(shape, dtype, "cpu", seed=sum(shape))
    out, hidden = torch.ops.oiv2.add_rms_norm(x, residual, weight, eps)
    ref_out, ref_hidden = add_rms_norm_ref(x, residual, weight, eps)
    hf_out, hf_hidden = _hf(x, residual, weight, eps)
    for got in (out, ref_out):  # the same operations as HF's: exact
        torch.testing.assert_close(got, hf_out, rtol=0, atol=0)
    for got in (hidden, ref_hidden):
        torch.testing.assert_close(got, hf_hidden, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    torch.library.opcheck(torch.ops.oiv2.add_rms_norm.default, (*_inputs(SHAPES[2], torch.float32, device, 0), 1e-6))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [*SHAPES, (2, 1, 4096), (1, 3, 8192)])
def test_triton_kernel_matches_reference(shape, dtype):
    x, residual, weight = _inputs(shape, dtype, "cuda", seed=sum(shape))
    out, hidden = torch.ops.oiv2.add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_hidden = add_rms_norm_ref(x, residual, weight, 1e-5)
    torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=0)  # one rounded add: exact
    # Default tolerances of the dtype: the kernel sums the squares in another order.
    torch.testing.assert_close(out, ref_out)
