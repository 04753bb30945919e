"""CUDA graphs of the decode program, one per batch bucket, captured at load.

Each bucket owns static input buffers and may use its own program (batch 1 has a specialised one); a
step copies the wave's tokens, positions and cache rows into the first B rows, points the remaining
rows at the scratch cache row (position 0), and replays the smallest bucket that holds B. All buckets
share one memory pool: they never run at once.

Each graph ends with oiv2::greedy_step: the argmax of every row's logits goes into the bucket's token
history and becomes its next input, and the positions advance. So a greedy wave (`start_greedy`)
copies its inputs in once and then only replays, one launch a step; `run` copies them in every step
and reads the logits, for sampling and scoring. The greedy step costs those a few microseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from oiv2compile.kernels.greedy_step import greedy_step


class DecodeBuffers:
    """The decode program's inputs for `size` rows, written in place, and the greedy step's state: what a
    CUDA graph bucket captures, and what a greedy wave without graphs (Engine) runs on."""

    def __init__(self, size: int, scratch_slot: int, history_len: int, device: torch.device) -> None:
        self.size = size
        self.scratch_slot = scratch_slot
        self.input_ids = torch.zeros((size, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((size,), dtype=torch.long, device=device)
        self.slots = torch.full((size,), scratch_slot, dtype=torch.long, device=device)
        self.last_index = torch.zeros((size,), dtype=torch.long, device=device)
        self.history = torch.zeros((size, history_len), dtype=torch.long, device=device)  # greedy tokens
        self.step = torch.zeros((1,), dtype=torch.long, device=device)  # the history column written next

    def fill(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """tokens, positions, slots [B] into the first B rows; the others at the scratch cache row."""
        batch = tokens.shape[0]
        self.input_ids[:batch, 0].copy_(tokens)
        self.positions[:batch].copy_(positions)
        self.slots[:batch].copy_(slots)
        if batch < self.size:
            self.positions[batch:].zero_()
            self.slots[batch:].fill_(self.scratch_slot)

    @torch.no_grad()
    def decode_and_pick(self, decode: Callable[..., torch.Tensor], caches: list[torch.Tensor]) -> torch.Tensor:
        """One decode step, then oiv2::greedy_step: the picked tokens become the next step's inputs."""
        logits = decode(self.input_ids, self.positions, self.slots, self.last_index, caches)  # [size, vocab]
        greedy_step(logits, self.input_ids, self.positions, self.history, self.step)
        return logits


class _Bucket(DecodeBuffers):
    def __init__(self, size: int, scratch_slot: int, history_len: int, device: torch.device) -> None:
        super().__init__(size, scratch_slot, history_len, device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits = torch.empty(0, device=device)  # set by capture


class DecodeGraphs:
    def __init__(
        self,
        program_for: Callable[[int], Callable[..., torch.Tensor]],
        caches: list[torch.Tensor],
        buckets: Sequence[int],
        scratch_slot: int,
        history_len: int,
        device: torch.device,
    ) -> None:
        """history_len: the most decode steps a greedy wave takes (max_seq_len will do)."""
        self.buckets = tuple(sorted(buckets))
        self._by_size = {b: _Bucket(b, scratch_slot, history_len, device) for b in self.buckets}
        # Warm up outside capture (module loading, lazy init) on a side stream, as capture requires.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for bucket in self._by_size.values():
                bucket.decode_and_pick(program_for(bucket.size), caches)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        pool = None
        for size in reversed(self.buckets):  # largest first: the pool it allocates serves the rest
            bucket = self._by_size[size]
            with torch.cuda.graph(bucket.graph, pool=pool):
                bucket.logits = bucket.decode_and_pick(program_for(size), caches)
            pool = bucket.graph.pool()
        torch.cuda.synchronize(device)

    def bucket_for(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots [B] on the device -> logits [B, vocab] (a view of static memory,
        valid until the next replay)."""
        bucket = self._fill(tokens, positions, slots)
        bucket.graph.replay()
        return bucket.logits[: tokens.shape[0]]

    def start_greedy(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
    ) -> tuple[Callable[[], None], torch.Tensor]:
        """Begin a greedy wave: tokens [B] are fed at positions [B] of cache rows slots [B]. Returns
        `advance`, which runs one step (one replay: the step feeds the tokens the step before picked),
        and history [B, history_len]: column i holds the tokens the (i + 1)-th advance picked. Valid
        until the next call of `run` or `start_greedy`."""
        bucket = self._fill(tokens, positions, slots)
        bucket.step.zero_()
        return bucket.graph.replay, bucket.history[: tokens.shape[0]]

    def _fill(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> _Bucket:
        bucket = self._by_size[self.bucket_for(tokens.shape[0])]
        bucket.fill(tokens, positions, slots)
        return bucket
