"""CUDA graphs of the decode program, one per batch bucket, captured at load.

Each bucket owns static input buffers and may use its own program (batch 1 has a specialised one); a step copies the wave's tokens, positions and cache rows
into the first B rows, points the remaining rows at the scratch cache row (position 0), and replays
the smallest bucket that holds B. All buckets share one memory pool: they never run at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class _Bucket:
    def __init__(self, size: int, scratch_slot: int, device: torch.device) -> None:
        self.size = size
        self.input_ids = torch.zeros((size, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((size,), dtype=torch.long, device=device)
        self.slots = torch.full((size,), scratch_slot, dtype=torch.long, device=device)
        self.last_index = torch.zeros((size,), dtype=torch.long, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits = torch.empty(0, device=device)  # set by capture


class DecodeGraphs:
    def __init__(
        self,
        program_for: Callable[[int], Callable[..., torch.Tensor]],
        caches: list[torch.Tensor],
        buckets: Sequence[int],
        scratch_slot: int,
        device: torch.device,
    ) -> None:
        self.scratch_slot = scratch_slot
        self.buckets = tuple(sorted(buckets))
        self._by_size = {b: _Bucket(b, scratch_slot, device) for b in self.buckets}
        # Warm up outside capture (module loading, lazy init) on a side stream, as capture requires.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for bucket in self._by_size.values():
                program_for(bucket.size)(bucket.input_ids, bucket.positions, bucket.slots, bucket.last_index, caches)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        pool = None
        for size in reversed(self.buckets):  # largest first: the pool it allocates serves the rest
            bucket = self._by_size[size]
            with torch.cuda.graph(bucket.graph, pool=pool):
                decode = program_for(size)
                bucket.logits = decode(bucket.input_ids, bucket.positions, bucket.slots, bucket.last_index, caches)
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
        batch = tokens.shape[0]
        bucket = self._by_size[self.bucket_for(batch)]
        bucket.input_ids[:batch, 0].copy_(tokens)
        bucket.positions[:batch].copy_(positions)
        bucket.slots[:batch].copy_(slots)
        if batch < bucket.size:
            bucket.positions[batch:].zero_()
            bucket.slots[batch:].fill_(self.scratch_slot)
        bucket.graph.replay()
        return bucket.logits[:batch]
