"""oiv2::gated_act: act(gate) * up over the output of a fused gate-and-up projection.

Shapes: x [..., 2I] holds the gate projection in x[..., :I] and the up projection in x[..., I:] (the
order in which fuse_ffn concatenates the weights); returns [..., I] in x's dtype. `activation` is one
of ACTIVATIONS: "silu", "gelu" (erf form) or "gelu_tanh" (tanh approximation). The activation's result
is rounded to x's dtype before the product, as Hugging Face's MLP rounds it, so that bf16 models match.

On CUDA one Triton program handles a block of the columns of one row: each gate and up element is
read once and each product written once (3 * I elements of traffic per row, no intermediate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from oiv2compile.kernels._triton import (
    HAS_TRITON,
    dependents_may_launch_early,
    launch_dependents,
    next_power_of_2,
    registering_triton_op,
    tl,
    triton,
)

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def gated_act_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The spec, and the CPU path."""
    gate, up = x.chunk(2, dim=-1)  # [..., I] each
    if activation == "silu":
        act = F.silu(gate)
    elif activation == "gelu":
        act = F.gelu(gate)
    elif activation == "gelu_tanh":
        act = F.gelu(gate, approximate="tanh")
    else:
        raise ValueError(f"gated_act: activation must be one of {list(ACTIVATIONS)}, not {activation!r}")
    return act * up


if HAS_TRITON:

    @triton.jit
    def _gated_act_kernel(
        X, Out, stride_x, stride_o, width, ACT: tl.constexpr, BLOCK: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr
    ):
        # The down projection streams its weights meanwhile.
        row = (tl.program_id(0) + launch_dependents(LAUNCH_DEPENDENTS)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = cols < width
        gate = tl.load(X + row * stride_x + cols, mask=valid, other=0.0)
        up = tl.load(X + row * stride_x + width + cols, mask=valid, other=0.0)
        g = gate.to(tl.float32)
        if ACT == 0:  # silu
            a = g * tl.sigmoid(g)
        elif ACT == 1:  # gelu, erf form
            a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        else:  # gelu, tanh approximation; tanh(z) = 2 * sigmoid(2z) - 1
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g * tl.sigmoid(2.0 * z)
        # Round the activation to the input dtype first, as the reference (and HF) does.
        a = a.to(gate.dtype).to(tl.float32)
        out = a * up.to(tl.float32)
        tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=valid)


def _gated_act_triton(x: torch.Tensor, activation: str) -> torch.Tensor:
    width = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * width)  # [R, 2I]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], width), dtype=x.dtype, device=x.device)  # [R, I]
    block = min(1024, next_power_of_2(width))
    grid = (rows.shape[0], triton.cdiv(width, block))
    wrap_triton(_gated_act_kernel)[grid](
        rows,
        out,
        rows.stride(0),
        out.stride(0),
        width,
        ACT=ACTIVATIONS.index(activation),
        BLOCK=block,
        LAUNCH_DEPENDENTS=dependents_may_launch_early(x.device),
        num_warps=4,
    )
    return out.reshape(*x.shape[:-1], width)


# The body doubles as the fake implementation (triton_op registers it as such).
with registering_triton_op():

    @triton_op("oiv2::gated_act", mutates_args=())
    def gated_act(x: torch.Tensor, activation: str) -> torch.Tensor:
        if activation not in ACTIVATIONS:
            raise ValueError(f"gated_act: activation must be one of {list(ACTIVATIONS)}, not {activation!r}")
        if HAS_TRITON and x.device.type == "cuda":
            return _gated_act_triton(x, activation)
        return gated_act_ref(x, activation)
