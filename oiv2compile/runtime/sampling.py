"""Token sampling on the device the logits are on, with no host synchronisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oiv2compile.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be 0 (greedy) or positive, not {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequestError(f"top_k must be at least 1, not {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], not {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


# A row of logits is reduced in two passes where it is long: ATen's argmax gives a [1, 128256] row to
# one thread block (29.8 us of a llama-1b decode step on an H100), while the maximum of each of up to
# 256 slices spreads over many: 5.7 us for both passes there (benchmarks/RESULTS.md, commit 3e4d00b).
_MAX_SLICES = 256
_MIN_LENGTH = 32768


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the index of each row's maximum [B] int64, the first one where several are
    equal, as torch.argmax gives it (NaN counts as the maximum)."""
    slices = _slices(logits.shape[-1]) if logits.is_cuda else 1
    if slices == 1:
        return logits.argmax(dim=-1)
    return two_pass_argmax(logits, slices)


def two_pass_argmax(logits: torch.Tensor, slices: int) -> torch.Tensor:
    """argmax over `slices` equal slices of each row, then over their maxima: the first slice holding
    the maximum, and the first index in it, is the first index of the row."""
    batch, vocab = logits.shape
    values, within = logits.reshape(batch, slices, vocab // slices).max(dim=-1)  # [B, slices]
    best = values.argmax(dim=-1, keepdim=True)  # [B, 1]
    return (best * (vocab // slices) + within.gather(1, best))[:, 0]


def _slices(vocab: int) -> int:
    """The largest power of two up to _MAX_SLICES dividing a row of at least _MIN_LENGTH; else 1."""
    if vocab < _MIN_LENGTH:
        return 1
    slices = _MAX_SLICES
    while vocab % slices:
        slices //= 2
    return slices if slices >= 16 else 1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64."""
    if params.greedy:
        return argmax(logits)
    scores = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs > params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with no sync (torch.multinomial
    # may synchronise).
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return argmax(probs / noise)
