"""The executor: owns the KV cache, runs the prefill and decode programs, samples tokens.

Step level (what the serving scheduler drives): `prefill` puts new sequences into free cache rows
(slots) with one batched prefill of the right-padded prompts; `decode` runs one step for any set of
slots, each at its own position; `release` frees slots. On CUDA each decode step replays a CUDA
graph captured at load for the smallest batch bucket that holds the set (padding rows write into a
scratch cache row).

`generate` and `stream` run waves of up to max_batch_size prompts on top of these: one prefill,
then one decode step per new token for the whole wave, sampling on the device, and the host waits
for the GPU only every few steps to see whether every sequence has stopped. A greedy wave keeps its
tokens on the device: oiv2::greedy_step picks each step's tokens into the next step's inputs (inside
the CUDA graph on CUDA, so a step is one replay) and into a history the host reads at the end.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oiv2compile.capture import DECODE, DECODE_B1, PREFILL, CacheSpec
from oiv2compile.errors import InvalidRequestError
from oiv2compile.runtime.cuda_graphs import DecodeBuffers, DecodeGraphs
from oiv2compile.runtime.sampling import SamplingParams, argmax, sample

Program = Callable[..., torch.Tensor]

# How often generate() looks at the GPU to stop early when every sequence has hit a stop token.
_STOP_CHECK_EVERY = 8


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens only, a stop token included
    text: str | None  # when the artifact has a tokenizer
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    time_to_first_token_s: float
    token_times_s: list[float] = field(default_factory=list)  # [0] is time to first token, then gaps

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second after the first (prefill excluded)."""
        decode = sum(self.token_times_s[1:])
        return (len(self.token_times_s) - 1) / decode if decode > 0 else float("nan")


@dataclass
class StreamToken:
    index: int  # which prompt
    token_id: int
    text: str | None  # the text this token adds, when there is a tokenizer


class Engine:
    def __init__(
        self,
        *,
        path: Path,
        manifest: dict[str, Any],
        programs: dict[str, Program],
        spec: CacheSpec,
        device: torch.device,
        tokenizer: Any | None,
        decode_buckets: Sequence[int],
        capture_graphs: bool,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.spec = spec
        self.device = device
        self.tokenizer = tokenizer
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self._prefill = programs[PREFILL.name]
        self._decode = programs[DECODE.name]
        self._decode_b1 = programs.get(DECODE_B1.name)
        self.caches = spec.allocate(device)
        self._free_slots = list(range(spec.max_batch_size))  # cache rows no sequence holds
        self._graphs: DecodeGraphs | None = None
        if capture_graphs and device.type == "cuda":
            self._graphs = DecodeGraphs(
                self._decode_for, self.caches, decode_buckets, spec.scratch_slot, spec.max_seq_len, device
            )

    @property
    def max_batch_size(self) -> int:
        return self.spec.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.spec.max_seq_len

    @property
    def cuda_graph_buckets(self) -> tuple[int, ...]:
        return self._graphs.buckets if self._graphs else ()

    @property
    def free_slots(self) -> int:
        """Cache rows free for new sequences."""
        return len(self._free_slots)

    @property
    def default_stop_token_ids(self) -> list[int]:
        """The model's end-of-sequence token ids."""
        eos = self.manifest["model"].get("eos_token_id")
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [eos]

    # ---- step level: what a scheduler drives ----------------------------------------------------

    def prompt_ids(self, prompt: str | Sequence[int], max_new_tokens: int, label: str = "The prompt") -> list[int]:
        """Token ids of one prompt, checked: not empty, in the vocabulary, and with max_new_tokens
        fitting in a cache row. `label` names the prompt in the error."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be a whole number of at least 1, not {max_new_tokens!r}.")
        ids = self._token_ids(label, prompt)
        if len(ids) > self.max_seq_len:
            raise InvalidRequestError(
                f"{label} has {len(ids)} tokens but the artifact's max_seq_len is {self.max_seq_len}; "
                "shorten it or rebuild with a larger --max-seq-len."
            )
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise InvalidRequestError(
                f"{label} ({len(ids)} tokens) plus max_new_tokens={max_new_tokens} needs "
                f"{len(ids) + max_new_tokens} cache positions but the artifact holds {self.max_seq_len}; "
                "lower max_new_tokens or rebuild with a larger --max-seq-len."
            )
        return ids

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[int], torch.Tensor]:
        """Put each prompt (checked token ids) into a free cache row with one batched prefill.
        Returns the slot of each and the logits after its last token, [B, vocab] on the device
        (valid until the next program runs). The slots stay held until `release`."""
        slots = self._acquire(len(prompts))
        try:
            lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
            input_ids = torch.zeros((len(prompts), int(lengths.max())), dtype=torch.long)  # right-padded
            for i, prompt in enumerate(prompts):
                input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            input_ids, lengths = input_ids.to(self.device), lengths.to(self.device)
            slot_ids = torch.tensor(slots, dtype=torch.long, device=self.device)
            logits = self._prefill(input_ids, torch.zeros_like(lengths), slot_ids, lengths - 1, self.caches)
        except BaseException:
            self.release(slots)
            raise
        return slots, logits

    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor | Sequence[int],
        positions: torch.Tensor | Sequence[int],
        slots: torch.Tensor | Sequence[int],
    ) -> torch.Tensor:
        """One decode step: feed tokens[b] at positions[b] of cache row slots[b] (all [B]) and return
        the logits after it, [B, vocab] on the device (valid until the next program runs). On CUDA
        this replays the graph of the smallest batch bucket that holds B."""
        tokens, positions, slots = (self._on_device(t) for t in (tokens, positions, slots))
        if self._graphs is not None:
            return self._graphs.run(tokens, positions, slots)
        last = torch.zeros_like(tokens)
        return self._decode_for(tokens.shape[0])(tokens[:, None], positions, slots, last, self.caches)

    def release(self, slots: Sequence[int]) -> None:
        """Free cache rows. What they hold is not cleared: attention reads only positions a
        sequence has written, and its next holder writes before it reads."""
        for slot in slots:
            if slot in self._free_slots or not 0 <= slot < self.max_batch_size:
                raise ValueError(f"slot {slot} is not held")
            self._free_slots.append(slot)

    # ---- public API -----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt; prompts beyond max_batch_size run in further waves."""
        ids, params, stops = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
        results: list[GenerationResult] = []
        for start in range(0, len(ids), self.max_batch_size):
            wave = ids[start : start + self.max_batch_size]
            steps, times = [], _StepClock(self.device)
            for tokens in self._run_wave(wave, max_new_tokens, params, stops, _STOP_CHECK_EVERY):
                steps.append(tokens)
                times.mark()
            token_rows = torch.stack(steps, dim=1).tolist()  # [B, steps]; the one sync of the wave
            step_times = times.intervals()
            for prompt, row in zip(wave, token_rows, strict=True):
                results.append(self._result(prompt, row, stops, max_new_tokens, step_times))
        return results

    def stream(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Iterator[StreamToken]:
        """Yield each new token as soon as it exists (one host sync per step)."""
        ids, params, stops = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
        for start in range(0, len(ids), self.max_batch_size):
            wave = ids[start : start + self.max_batch_size]
            done = [False] * len(wave)
            generated: list[list[int]] = [[] for _ in wave]
            texts = [""] * len(wave)
            for tokens in self._run_wave(wave, max_new_tokens, params, stops, 1):
                for i, token in enumerate(tokens.tolist()):
                    if done[i]:
                        continue
                    generated[i].append(token)
                    done[i] = token in stops
                    yield StreamToken(start + i, token, self._text_delta(generated[i], texts, i))

    @torch.no_grad()
    def logits_for(self, prompt: Sequence[int], continuation: Sequence[int] = ()) -> torch.Tensor:
        """Teacher-forced logits: [1 + len(continuation), vocab] float32 on the host. Row 0 is the
        prediction after the prompt (prefill); row i + 1 after feeding continuation[i] (decode)."""
        ids, _, _ = self._prepare([list(prompt)], len(continuation) + 1, 0.0, None, None, None, [])
        if continuation:
            self._token_ids("The continuation", list(continuation))
        tokens = torch.tensor([ids[0] + list(continuation)], dtype=torch.long, device=self.device)
        rows = [logits.float().clone() for logits in self._forced_steps(tokens, len(ids[0]))]
        return torch.cat(rows).cpu()

    @torch.no_grad()
    def score(
        self, windows: Sequence[Sequence[int]], progress: Callable[[int, int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced scoring of equal-length token windows through the programs (and CUDA graphs)
        that generation uses: a prefill of each window's first token, then one decode step per further
        token, max_batch_size windows at a time. For positions 1.. of every window returns the negative
        log-likelihood of the actual token (float64) and the most likely token, both [N, W-1] on the host.
        `progress(done, total)` is called after each batch of windows."""
        if not windows:
            raise InvalidRequestError("Give at least one window of tokens to score.")
        width = len(windows[0])
        if width < 2 or any(len(w) != width for w in windows):
            raise InvalidRequestError("Score windows must all have the same length, of at least 2 tokens.")
        if width - 1 > self.max_seq_len:
            raise InvalidRequestError(
                f"Windows of {width} tokens need {width - 1} cache positions but the artifact holds {self.max_seq_len}."
            )
        all_ids = torch.tensor(
            [self._token_ids(f"Window {i}", list(w)) for i, w in enumerate(windows)], dtype=torch.long
        )
        nll_rows, top_rows = [], []
        for start in range(0, len(all_ids), self.max_batch_size):
            wave = all_ids[start : start + self.max_batch_size].to(self.device)
            nlls, tops = [], []
            for i, logits in enumerate(self._forced_steps(wave[:, :-1], 1)):
                logp = torch.log_softmax(logits.float(), dim=-1)
                nlls.append(-logp.gather(1, wave[:, i + 1, None])[:, 0])
                tops.append(argmax(logits))
            nll_rows.append(torch.stack(nlls, dim=1).double().cpu())
            top_rows.append(torch.stack(tops, dim=1).cpu())
            if progress is not None:
                progress(min(start + self.max_batch_size, len(all_ids)), len(all_ids))
        return torch.cat(nll_rows), torch.cat(top_rows)

    # ---- internals ------------------------------------------------------------------------------

    def _prepare(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        stop_token_ids: Sequence[int] | None,
    ) -> tuple[list[list[int]], SamplingParams, set[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise InvalidRequestError("Give a non-empty list of prompts (strings or lists of token ids).")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = [self.prompt_ids(p, max_new_tokens, label=f"Prompt {i}") for i, p in enumerate(prompts)]  # type: ignore[arg-type]
        stops = set(self.default_stop_token_ids if stop_token_ids is None else stop_token_ids)
        return ids, params, stops

    def _token_ids(self, label: str, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("This artifact has no tokenizer; pass prompts as lists of token ids.")
            if not prompt:
                raise InvalidRequestError(f"{label} is empty; give at least one character.")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequestError(f"{label} is empty; give at least one token.")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{label} has token id {bad[0]!r}, outside the vocabulary [0, {self.vocab_size})."
            )
        return ids

    def _acquire(self, n: int) -> list[int]:
        if n > len(self._free_slots):
            raise InvalidRequestError(
                f"{n} sequences need cache rows but {len(self._free_slots)} of {self.max_batch_size} are free; "
                "release finished sequences first."
            )
        self._free_slots.sort()
        taken, self._free_slots = self._free_slots[:n], self._free_slots[n:]
        return taken

    def _on_device(self, values: torch.Tensor | Sequence[int]) -> torch.Tensor:
        if isinstance(values, torch.Tensor):
            return values.to(self.device)
        return torch.tensor(list(values), dtype=torch.long, device=self.device)

    def _run_wave(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams,
        stops: set[int],
        check_every: int,
    ) -> Iterator[torch.Tensor]:
        """Yield the [B] token tensor of each step, on the device, without waiting for it. The wave
        holds its cache rows until the generator ends."""
        generator = params.generator(self.device)
        stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=self.device)
        slots, logits = self.prefill(prompts)
        try:
            slot_ids = self._on_device(slots)
            tokens = sample(logits, params, generator)
            finished = torch.isin(tokens, stop_ids)
            yield tokens
            positions = self._on_device([len(p) for p in prompts])  # where each fed token goes
            if params.greedy:
                advance, history = self._start_greedy(tokens, positions, slot_ids, max_new_tokens - 1)
                checked = 0  # history columns already looked at for stop tokens
                for step in range(1, max_new_tokens):
                    advance()
                    yield history[:, step - 1]
                    if stops and step % check_every == 0:
                        finished = finished | torch.isin(history[:, checked:step], stop_ids).any(dim=1)
                        checked = step
                        if bool(finished.all()):
                            return
                return
            for step in range(1, max_new_tokens):
                logits = self.decode(tokens, positions, slot_ids)
                tokens = sample(logits, params, generator)
                finished = finished | torch.isin(tokens, stop_ids)
                positions = positions + 1
                yield tokens
                if stops and step % check_every == 0 and bool(finished.all()):
                    return
        finally:
            self.release(slots)

    def _start_greedy(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, steps: int
    ) -> tuple[Callable[[], None], torch.Tensor]:
        """Greedy decoding of `steps` steps from tokens [B] at positions [B] of cache rows slots [B]:
        `advance` runs one step; column i of history [B, >= steps] holds what the (i + 1)-th picked.
        On CUDA the graphs do both; elsewhere the program and oiv2::greedy_step run here."""
        if self._graphs is not None:
            return self._graphs.start_greedy(tokens, positions, slots)
        buffers = DecodeBuffers(tokens.shape[0], self.spec.scratch_slot, max(steps, 1), self.device)
        buffers.fill(tokens, positions, slots)
        program = self._decode_for(tokens.shape[0])

        def advance() -> None:
            buffers.decode_and_pick(program, self.caches)

        return advance, buffers.history

    def _forced_steps(self, tokens: torch.Tensor, prompt_len: int) -> Iterator[torch.Tensor]:
        """Logits [B, vocab] after the first prompt_len tokens of every row (one prefill), then after
        each further token (one decode step each). Each is valid until the next is asked for."""
        batch, total = tokens.shape
        slots = self._acquire(batch)
        try:
            slot_ids = self._on_device(slots)
            zeros = torch.zeros(batch, dtype=torch.long, device=self.device)
            yield self._prefill(
                tokens[:, :prompt_len].contiguous(), zeros, slot_ids, zeros + prompt_len - 1, self.caches
            )
            for position in range(prompt_len, total):
                yield self.decode(tokens[:, position].contiguous(), zeros + position, slot_ids)
        finally:
            self.release(slots)

    def _decode_for(self, batch: int) -> Program:
        return self._decode_b1 if batch == 1 and self._decode_b1 is not None else self._decode

    def _result(
        self, prompt: list[int], row: list[int], stops: set[int], max_new_tokens: int, step_times: list[float]
    ) -> GenerationResult:
        finish = "length"
        for n, token in enumerate(row):
            if token in stops:
                row, finish = row[: n + 1], "stop"
                break
        text = self.tokenizer.decode(row, skip_special_tokens=True) if self.tokenizer is not None else None
        times = step_times[: len(row)]
        return GenerationResult(row, text, finish, len(prompt), times[0], times)

    def _text_delta(self, generated: list[int], texts: list[str], i: int) -> str | None:
        if self.tokenizer is None:
            return None
        full = self.tokenizer.decode(generated, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return ""
        delta = full[len(texts[i]) :] if full.startswith(texts[i]) else full
        texts[i] = full
        return delta


class _StepClock:
    """Per-step times without a sync per step: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        if self.cuda:
            self.start: Any = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            stamps = [0.0] + [self.start.elapsed_time(m) / 1e3 for m in self.marks]
        else:
            stamps = [0.0] + [m - self.start for m in self.marks]
        return [b - a for a, b in itertools.pairwise(stamps)]
