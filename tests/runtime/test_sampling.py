"""Sampling: greedy, seeded sampling, and the supports that top-k and top-p allow."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.errors import InvalidRequestError
from oiv2compile.runtime.sampling import SamplingParams, _slices, argmax, sample, two_pass_argmax

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0], [5.0, 0.0, 4.9, 0.1, 0.2]])


def test_greedy_is_argmax():
    params = SamplingParams()
    assert sample(LOGITS, params, params.generator(LOGITS.device)).tolist() == [1, 0]


def test_seeded_sampling_repeats():
    params = SamplingParams(temperature=1.0, seed=7)
    a = torch.stack([sample(LOGITS, params, g) for g in [params.generator(torch.device("cpu"))] for _ in range(50)])
    b = torch.stack([sample(LOGITS, params, g) for g in [params.generator(torch.device("cpu"))] for _ in range(50)])
    assert torch.equal(a, b)


def test_distribution_matches_softmax():
    params = SamplingParams(temperature=1.0, seed=0)
    gen = params.generator(torch.device("cpu"))
    logits = LOGITS[:1].expand(20000, -1)
    counts = torch.bincount(sample(logits, params, gen), minlength=5).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(LOGITS[0], -1), atol=0.015, rtol=0)  # ~4 sigma at n=20000


def test_top_k_and_top_p_restrict_the_support():
    gen = torch.Generator().manual_seed(0)
    logits = LOGITS[:1].expand(5000, -1)
    top2 = sample(logits, SamplingParams(temperature=2.0, top_k=2), gen)
    assert set(top2.tolist()) == {1, 3}
    # softmax of row 0 is about [0.05, 0.50, 0.07, 0.31, 0.02]: 0.50 alone does not reach 0.7,
    # 0.50 + 0.31 does, so top_p=0.7 keeps tokens 1 and 3.
    nucleus = sample(logits, SamplingParams(temperature=1.0, top_p=0.7), gen)
    assert set(nucleus.tolist()) == {1, 3}
    assert set(sample(logits, SamplingParams(temperature=1.0, top_k=1), gen).tolist()) == {1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_is_argmax_ties_and_nan_included(dtype):
    """The first index of the maximum, as torch.argmax: ties within a slice, across slices, at slice
    edges, a row of equal values, -inf, and NaN (the maximum where there is one)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 4096, generator=gen).to(dtype)
    rows[1, [100, 2000, 3000]] = 9.0  # three slices hold the maximum: the first counts
    rows[2, [255, 256]] = 9.0  # the last of one slice and the first of the next
    rows[3] = 1.0  # all equal: index 0
    rows[4, 17] = float("inf")
    rows[5] = float("-inf")
    rows[6, 4000] = float("nan")
    rows[7, [300, 301]] = 9.0  # two equal in one slice
    for slices in (16, 64, 256):
        assert torch.equal(two_pass_argmax(rows, slices), rows.argmax(dim=-1)), slices


def test_argmax_slices_by_the_vocabulary():
    assert _slices(128256) == 256 and _slices(151936) == 128 and _slices(65536) == 256
    assert _slices(40001) == 1 and _slices(32000) == 1  # odd, or short enough for one pass
    logits = torch.randn(3, 128256)
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))  # on the CPU: torch.argmax itself


@pytest.mark.cuda
def test_argmax_on_cuda_takes_two_passes_and_agrees():
    logits = torch.randn(5, 128256, device="cuda", dtype=torch.bfloat16)
    logits[1, [7, 70000]] = 50.0
    assert _slices(logits.shape[-1]) == 256
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
