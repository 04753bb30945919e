"""oiv2::greedy_step against torch.argmax and its reference: ties, NaN, -inf, odd vocabularies, the
history ring's wrap, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.kernels.greedy_step import greedy_step_ref

# [B, V]: one slice, a slice and one logit, an odd width, a llama-3 vocabulary (251 slices of 512).
SHAPES = [(1, 7), (3, 513), (2, 1001), (5, 128256)]


def _state(rows, history_len, step, device):
    gen = torch.Generator().manual_seed(rows * 31 + history_len)
    input_ids = torch.randint(0, 100, (rows, 1), generator=gen).to(device)
    positions = torch.randint(0, 100, (rows,), generator=gen).to(device)
    history = torch.randint(0, 100, (rows, history_len), generator=gen).to(device)
    return input_ids, positions, history, torch.tensor([step], device=device)


def _logits(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen)
    rows, vocab = shape
    # Ties: row 0 repeats its maximum at a later index; the first one must win.
    top = int(logits[0].argmax())
    if top + 1 < vocab:
        logits[0, -1] = logits[0, top]
    if rows > 1:  # a row of -inf and one finite value past the first slice, if there is one
        logits[1] = float("-inf")
        logits[1, min(vocab - 1, 600)] = -1e30
    if rows > 2:  # NaN counts as the maximum: the first NaN, even after +inf
        logits[2, 0] = float("inf")
        logits[2, vocab // 2] = float("nan")
        logits[2, vocab - 1] = float("nan")
    if rows > 3:  # the maximum in the last, partial slice
        logits[3, -1] = 100.0
    if rows > 4:  # all equal: the first index
        logits[4] = 0.5
    return logits.to(device=device, dtype=dtype)


def _run(op, logits, history_len, step):
    input_ids, positions, history, step_t = _state(logits.shape[0], history_len, step, logits.device)
    before = positions.clone()
    op(logits, input_ids, positions, history, step_t)
    return input_ids, positions - before, history, step_t


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_argmax(shape):
    logits = _logits(shape, torch.float32, "cpu", seed=sum(shape))
    input_ids, advanced, history, step = _run(greedy_step_ref, logits, history_len=4, step=3)
    expected = logits.argmax(dim=-1)
    assert input_ids[:, 0].tolist() == expected.tolist()
    assert history[:, 3].tolist() == expected.tolist()
    assert advanced.tolist() == [1] * shape[0]
    assert step.tolist() == [0]  # 3 + 1 wraps in a history of 4
    if shape[0] > 4:
        assert expected[0] < shape[1] - 1 and expected[2] == shape[1] // 2 and expected[4] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    logits = _logits((3, 1001), torch.float32, device, seed=0)
    torch.library.opcheck(torch.ops.oiv2.greedy_step.default, (logits, *_state(3, 5, 2, device)))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="must agree on B"):
        torch.ops.oiv2.greedy_step(torch.zeros(2, 8), *_state(3, 4, 0, "cpu"))
    with pytest.raises(ValueError, match="must be int64"):
        input_ids, positions, history, step = _state(2, 4, 0, "cpu")
        torch.ops.oiv2.greedy_step(torch.zeros(2, 8), input_ids.int(), positions, history, step)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("step", [0, 2])
def test_triton_kernel_matches_reference(shape, dtype, step):
    logits = _logits(shape, dtype, "cuda", seed=sum(shape) + step)
    got = _run(torch.ops.oiv2.greedy_step, logits, history_len=3, step=step)
    want = _run(greedy_step_ref, logits, history_len=3, step=step)
    for a, b in zip(got, want, strict=True):
        assert a.tolist() == b.tolist()
    assert got[0][:, 0].tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.cuda
def test_replayed_in_a_cuda_graph_feeds_itself():
    """Captured once, each replay picks from the logits of the tokens the replay before picked."""
    vocab = 1000
    table = torch.randn(vocab, vocab, device="cuda")  # logits of the next token given the current one
    input_ids, positions, history, step = _state(2, 6, 0, "cuda")
    input_ids.copy_(torch.tensor([[3], [7]], device="cuda"))
    positions.zero_()
    step.zero_()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) outside the capture
        torch.ops.oiv2.greedy_step(
            table[input_ids[:, 0]], input_ids.clone(), positions.clone(), history.clone(), step.clone()
        )
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        torch.ops.oiv2.greedy_step(table[input_ids[:, 0]], input_ids, positions, history, step)
    for _ in range(5):
        graph.replay()
    expected, current = [], torch.tensor([3, 7])
    for _ in range(5):
        current = table.cpu()[current].argmax(dim=-1)
        expected.append(current.tolist())
    assert history[:, :5].T.tolist() == expected
    assert positions.tolist() == [5, 5] and step.tolist() == [5]
    assert input_ids[:, 0].tolist() == expected[-1]
