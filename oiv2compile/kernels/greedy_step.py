"""oiv2::greedy_step: the end of a greedy decode step, on the device, in place: the next token of every
row is the argmax of its logits, and it becomes the next step's input.

Shapes: logits [B, V], input_ids [B, 1] int64, positions [B] int64, history [B, H] int64, step [1]
int64 in [0, H). For each row b, with t = argmax(logits[b]) (the first index of the maximum, NaN
counting as the maximum, as torch.argmax gives it):
    history[b, step] = t;  input_ids[b, 0] = t;  positions[b] += 1
and then step = (step + 1) % H. Returns nothing.

The executor records it into each CUDA graph of the decode program (runtime/cuda_graphs.py), so a
greedy wave replays one graph a step and launches nothing else: no copy of the tokens back into the
graph's inputs, no argmax, no position update from the host. history keeps every token of the wave
(H = max_seq_len holds a whole wave) for the host to read once at the end.

On CUDA two Triton kernels: the first takes the maximum of each 512-wide slice of a row (one program
a slice, so a 128256-wide row spreads over 251 programs) and advances `step`; the second, one program
a row, picks the first slice holding the row's maximum and writes the token. A slice's first maximum
and the first slice holding the maximum give the row's first maximum.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from oiv2compile.kernels._triton import HAS_TRITON, next_power_of_2, registering_triton_op, tl, triton

_SLICE = 512  # logits a first-pass program reduces


def greedy_step_ref(
    logits: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, history: torch.Tensor, step: torch.Tensor
) -> None:
    """The spec, and the CPU path."""
    tokens = logits.argmax(dim=-1)  # [B]
    history.index_copy_(1, step, tokens[:, None])
    input_ids[:, 0] = tokens
    positions.add_(1)
    step.copy_(torch.remainder(step + 1, history.shape[1]))


if HAS_TRITON:

    @triton.jit
    def _first_max(values, index, valid):
        """The first index holding the maximum of `values` (NaN counting as the maximum) over the
        entries where `valid`, and that maximum: (value, index) of a 1-d block."""
        big = 2147483647
        is_nan = (values != values) & valid
        first_nan = tl.min(tl.where(is_nan, index, big), axis=0)
        finite = tl.where(valid & (values == values), values, float("-inf"))
        top = tl.max(finite, axis=0)
        first_top = tl.min(tl.where(valid & (finite == top), index, big), axis=0)
        has_nan = first_nan < big
        return tl.where(has_nan, float("nan"), top), tl.where(has_nan, first_nan, first_top)

    @triton.jit
    def _slice_max_kernel(
        Logits, SliceMax, SliceIndex, Step, stride_l, vocab, slices, history_len, SLICE: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        cols = part * SLICE + tl.arange(0, SLICE)
        valid = cols < vocab
        values = tl.load(Logits + row * stride_l + cols, mask=valid, other=float("-inf")).to(tl.float32)
        top, at = _first_max(values, cols, valid)
        tl.store(SliceMax + row * slices + part, top)
        tl.store(SliceIndex + row * slices + part, at)
        if (row == 0) & (part == 0):  # the second kernel reads the step after this one
            tl.store(Step, (tl.load(Step) + 1) % history_len)

    @triton.jit
    def _pick_token_kernel(
        SliceMax,
        SliceIndex,
        InputIds,
        Positions,
        History,
        Step,
        stride_i,
        stride_p,
        stride_hb,
        stride_hs,
        slices,
        history_len,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        part = tl.arange(0, BLOCK)
        valid = part < slices
        values = tl.load(SliceMax + row * slices + part, mask=valid, other=float("-inf"))
        _top, best = _first_max(values, part, valid)
        token = tl.sum(tl.where(part == best, tl.load(SliceIndex + row * slices + part, mask=valid, other=0), 0))
        written = (tl.load(Step) + history_len - 1) % history_len  # the step before the first kernel's advance
        tl.store(History + row * stride_hb + written * stride_hs, token.to(tl.int64))
        tl.store(InputIds + row * stride_i, token.to(tl.int64))
        tl.store(Positions + row * stride_p, tl.load(Positions + row * stride_p) + 1)


def _greedy_step_triton(
    logits: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, history: torch.Tensor, step: torch.Tensor
) -> None:
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    slices = triton.cdiv(vocab, _SLICE)
    slice_max = torch.empty((rows, slices), dtype=torch.float32, device=logits.device)  # [B, slices]
    slice_index = torch.empty((rows, slices), dtype=torch.int32, device=logits.device)
    history_len = history.shape[1]
    wrap_triton(_slice_max_kernel)[(rows, slices)](
        logits, slice_max, slice_index, step, logits.stride(0), vocab, slices, history_len, SLICE=_SLICE, num_warps=4
    )
    wrap_triton(_pick_token_kernel)[(rows,)](
        slice_max,
        slice_index,
        input_ids,
        positions,
        history,
        step,
        input_ids.stride(0),
        positions.stride(0),
        history.stride(0),
        history.stride(1),
        slices,
        history_len,
        BLOCK=next_power_of_2(slices),
        num_warps=4,
    )


def _check(
    logits: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, history: torch.Tensor, step: torch.Tensor
) -> None:
    rows = logits.shape[0]
    if logits.dim() != 2 or input_ids.shape != (rows, 1) or positions.shape != (rows,) or history.shape[0] != rows:
        raise ValueError(
            "greedy_step: logits [B, V], input_ids [B, 1], positions [B] and history [B, H] must agree on B, "
            f"not {tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(positions.shape)}, {tuple(history.shape)}"
        )
    if step.shape != (1,) or history.shape[1] < 1:
        raise ValueError(f"greedy_step: step must be [1] and history at least one column wide, not {tuple(step.shape)}")
    if not (input_ids.dtype == positions.dtype == history.dtype == step.dtype == torch.int64):
        raise ValueError("greedy_step: input_ids, positions, history and step must be int64")


with registering_triton_op():

    @triton_op("oiv2::greedy_step", mutates_args=("input_ids", "positions", "history", "step"))
    def greedy_step(
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        history: torch.Tensor,
        step: torch.Tensor,
    ) -> None:
        _check(logits, input_ids, positions, history, step)
        if HAS_TRITON and logits.device.type == "cuda":
            _greedy_step_triton(logits, input_ids, positions, history, step)
        else:
            greedy_step_ref(logits, input_ids, positions, history, step)
