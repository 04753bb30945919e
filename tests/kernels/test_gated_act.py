"""oiv2::gated_act against Hugging Face's activations and against its reference, on fresh random
inputs of several shapes, odd sizes included."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from oiv2compile.kernels.gated_act import ACTIVATIONS, gated_act_ref

SHAPES = [(1, 1, 8), (3, 1, 22), (2, 7, 128), (5, 3, 2 * 1000 + 2)]  # [B, S, 2I]; I = 4, 11, 64, 1001
# HF's hidden_act names for each of the op's activations.
HF_NAMES = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _x(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_hf_mlp_activation(shape, dtype, activation):
    x = _x(shape, dtype, "cpu", seed=sum(shape))
    gate, up = x.chunk(2, dim=-1)
    expected = ACT2FN[HF_NAMES[activation]](gate) * up
    torch.testing.assert_close(gated_act_ref(x, activation), expected, rtol=0, atol=0)  # the same operations
    torch.testing.assert_close(torch.ops.oiv2.gated_act(x, activation), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck(device, activation):
    torch.library.opcheck(torch.ops.oiv2.gated_act.default, (_x(SHAPES[2], torch.float32, device, 0), activation))


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.oiv2.gated_act(torch.zeros(2, 4), "relu")


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernel_matches_reference(shape, dtype, activation):
    x = _x(shape, dtype, "cuda", seed=sum(shape))
    # Default tolerances of the dtype: the kernel computes the activation in float32 and rounds where
    # the reference does, so only the last bit of the activation can differ.
    torch.testing.assert_close(torch.ops.oiv2.gated_act(x, activation), gated_act_ref(x, activation))
    strided = _x((shape[0], 2 * shape[1], shape[2]), dtype, "cuda", seed=1)[:, ::2]  # rows not contiguous
    torch.testing.assert_close(torch.ops.oiv2.gated_act(strided, activation), gated_act_ref(strided, activation))
