"""Continuous batching over the Engine: requests join and leave the running batch at every step.

One worker thread owns the engine (it is not thread-safe). Any thread may `submit` a request or
`cancel` one; the worker reports each request's progress to the request's `sink`, on the worker
thread, so a sink must only hand the output over (to a queue or an event loop), never block.

Each step of the worker:
  1. drop cancelled requests (a running one frees its cache slot at once);
  2. one decode step for every running sequence together (`Engine.decode`: on CUDA the smallest
     CUDA-graph batch bucket that holds them, padded as the engine pads);
  3. admit waiting requests, highest priority first then oldest, into the free slots while their
     prompts fit the prefill token budget (at least one per step, so a prompt longer than the budget
     still runs), and prefill them in one batch. The prefill gives their first token; they join
     the decode at the next step.
A sequence that ends (a stop token, a stop string, max_tokens) frees its slot in the step that ends
it, so a waiting request takes it at the next step. Sampling is per request: greedy rows share one
argmax, sampled rows use their own parameters and their own seeded generator, so batching never
changes a request's tokens.

Faults stay with their request: an exception while sampling, detokenizing or reporting one request
fails that request only. An exception of a whole prefill batch is retried one prompt at a time, so
only the prompt that raises fails; an exception of a decode step fails the sequences of that step.
An exception outside those (a bug of the loop) fails every request and leaves the scheduler
`failed`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from oiv2compile.errors import Oiv2Error
from oiv2compile.runtime.engine import Engine
from oiv2compile.runtime.sampling import SamplingParams, argmax, sample

log = logging.getLogger(__name__)

# Default for the prompt tokens prefilled in one step: enough for a few typical prompts, small
# enough that running sequences wait for at most about one long prompt's prefill per step.
DEFAULT_PREFILL_TOKEN_BUDGET = 2048
DEFAULT_MAX_QUEUE = 256


class QueueFullError(Oiv2Error):
    """The waiting queue holds max_queue requests; the request is refused (HTTP 429)."""


class NotAcceptingError(Oiv2Error):
    """The scheduler is draining, stopped or failed; the request is refused (HTTP 503)."""


@dataclass(frozen=True)
class RequestParams:
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] | None = None  # None: the model's end-of-sequence tokens
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    priority: int = 0  # higher runs first; equal priorities run in arrival order


@dataclass
class Output:
    """What one step adds to a request, handed to its sink."""

    text: str  # the text these tokens add ("" without a tokenizer, or while a stop string may start)
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # so far, a stop token included
    finish_reason: str | None = None  # None while running; "stop", "length", "cancelled" or "error"
    error: str | None = None


Sink = Callable[[Output], None]


class Observer(Protocol):
    """What the scheduler reports for metrics; every call comes from the worker thread."""

    def admitted(self, queue_s: float, prompt_tokens: int) -> None: ...
    def token(self, first: bool, seconds: float) -> None: ...  # time to first token, or since the last one
    def finished(self, reason: str, e2e_s: float) -> None: ...
    def step(self, running: int, waiting: int, slots_in_use: int) -> None: ...


class NoObserver:
    """An observer that ignores every event; subclass it to watch some of them."""

    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        pass

    def token(self, first: bool, seconds: float) -> None:
        pass

    def finished(self, reason: str, e2e_s: float) -> None:
        pass

    def step(self, running: int, waiting: int, slots_in_use: int) -> None:
        pass


class _Sequence:
    def __init__(self, number: int, prompt_ids: list[int], params: RequestParams, stops: frozenset[int], sink: Sink):
        self.number = number
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_token_ids = stops
        self.sink = sink
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.last_token_time = self.arrival
        self.slot = -1  # the cache row, while running
        self.position = 0  # where the next fed token goes
        self.generated: list[int] = []
        self.text = ""  # the text sent so far
        self.generator: torch.Generator | None = None

    def sort_key(self) -> tuple[int, int]:
        return (-self.params.priority, self.number)

    def __lt__(self, other: _Sequence) -> bool:
        return self.sort_key() < other.sort_key()


class RequestHandle:
    def __init__(self, scheduler: Scheduler, seq: _Sequence) -> None:
        self._scheduler = scheduler
        self._seq = seq

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt_ids)

    def cancel(self) -> None:
        """Stop the request at the next step and free its slot; idempotent, from any thread."""
        self._scheduler._cancel(self._seq)


class Scheduler:
    CREATED, RUNNING, DRAINING, STOPPED, FAILED = "created", "running", "draining", "stopped", "failed"

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
        observer: Observer | None = None,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, not {max_queue}")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be at least 1, not {prefill_token_budget}")
        self.engine = engine
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        self.observer: Observer = observer or NoObserver()
        self.state = self.CREATED
        self.error: str | None = None  # why the scheduler failed
        self._cond = threading.Condition()
        self._tokenizer_lock = threading.Lock()  # HF tokenizers are not safe to share across threads
        self._waiting: list[_Sequence] = []  # a heap by (priority, arrival)
        self._running: list[_Sequence] = []  # worker thread only
        self._cancelled_waiting: list[_Sequence] = []
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None

    # ---- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self.state != self.CREATED:
                raise RuntimeError(f"the scheduler is {self.state}")
            self.state = self.RUNNING
        self._thread = threading.Thread(target=self._loop, name="oiv2-scheduler", daemon=True)
        self._thread.start()

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """The checked token ids of a prompt (InvalidRequestError if it is empty or fills the cache)."""
        with self._tokenizer_lock:
            return self.engine.prompt_ids(prompt, 1)

    def submit(self, prompt: str | Sequence[int], params: RequestParams, sink: Sink) -> RequestHandle:
        """Queue a request. Raises InvalidRequestError (bad or too long prompt), QueueFullError or
        NotAcceptingError at once; everything after comes through `sink`."""
        with self._tokenizer_lock:
            ids = self.engine.prompt_ids(prompt, params.max_tokens)
        stops = params.stop_token_ids
        if stops is None:
            stops = frozenset(self.engine.default_stop_token_ids)
        with self._cond:
            if self.state not in (self.CREATED, self.RUNNING):
                raise NotAcceptingError(f"The server is {self.state} and takes no new requests; retry elsewhere.")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (the limit is {self.max_queue}); retry later."
                )
            seq = _Sequence(next(self._numbers), ids, params, stops, sink)
            heapq.heappush(self._waiting, seq)
            self._cond.notify()
        return RequestHandle(self, seq)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish the waiting and running ones first, else cancel
        them. Waits for the worker up to `timeout` seconds."""
        with self._cond:
            if self.state == self.CREATED:
                self.state = self.STOPPED
                self._cancelled_waiting.extend(self._waiting)
                self._waiting.clear()
                pending = self._cancelled_waiting
            else:
                pending = []
                if self.state == self.RUNNING:
                    self.state = self.DRAINING
                if not drain:
                    for seq in self._running:
                        seq.cancelled = True
                    for seq in self._waiting:
                        seq.cancelled = True
                    self._cancelled_waiting.extend(self._waiting)
                    self._waiting.clear()
                self._cond.notify()
        for seq in pending:
            self._emit(seq, Output("", [], len(seq.prompt_ids), 0, "cancelled"))
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "slots_in_use": self.engine.max_batch_size - self.engine.free_slots,
            }

    def _cancel(self, seq: _Sequence) -> None:
        with self._cond:
            if seq.cancelled:
                return
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                heapq.heapify(self._waiting)
                self._cancelled_waiting.append(seq)
            self._cond.notify()

    # ---- the worker thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        # The engine's CUDA graphs and streams belong to its device; a new thread starts on device 0.
        device = self.engine.device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self._run()

    def _run(self) -> None:
        cancelled: list[_Sequence] = []
        admitted: list[_Sequence] = []
        try:
            while True:
                with self._cond:
                    while (
                        not (self._waiting or self._running or self._cancelled_waiting) and self.state == self.RUNNING
                    ):
                        self._cond.wait()
                    if self.state == self.DRAINING and not (self._waiting or self._running or self._cancelled_waiting):
                        self.state = self.STOPPED
                        return
                    cancelled, self._cancelled_waiting = self._cancelled_waiting, []
                    admitted = self._admit()
                self._step(cancelled, admitted)
        except BaseException as exc:
            log.exception("the scheduler's loop failed")
            with self._cond:
                self.state = self.FAILED
                self.error = f"{type(exc).__name__}: {exc}"
                pending = {id(s): s for s in [*admitted, *cancelled, *self._waiting, *self._running]}
                pending.update((id(s), s) for s in self._cancelled_waiting)
                self._waiting.clear()
                self._running.clear()
                self._cancelled_waiting.clear()
            for seq in pending.values():
                if seq.slot >= 0:
                    self.engine.release([seq.slot])
                    seq.slot = -1
                self._emit(seq, self._error_output(seq, exc))

    def _admit(self) -> list[_Sequence]:
        """Pop the waiting requests that this step prefills (lock held)."""
        # Cancelled running sequences give their slots back at the start of the step.
        free = self.engine.free_slots + sum(1 for s in self._running if s.cancelled)
        batch: list[_Sequence] = []
        tokens = 0
        while self._waiting and len(batch) < free:
            head = self._waiting[0]
            if batch and tokens + len(head.prompt_ids) > self.prefill_token_budget:
                break
            batch.append(heapq.heappop(self._waiting))
            tokens += len(head.prompt_ids)
        return batch

    def _step(self, cancelled: list[_Sequence], admitted: list[_Sequence]) -> None:
        for seq in cancelled:
            self._emit(seq, Output("", [], len(seq.prompt_ids), 0, "cancelled"))
            self.observer.finished("cancelled", time.perf_counter() - seq.arrival)
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, Output("", [], len(seq.prompt_ids), len(seq.generated), "cancelled"))
        if self._running:
            self._decode()
        if admitted:
            now = time.perf_counter()
            for seq in admitted:
                self.observer.admitted(now - seq.arrival, len(seq.prompt_ids))
            self._prefill(admitted)
        stats = self.stats()
        self.observer.step(stats["running"], stats["waiting"], stats["slots_in_use"])

    def _decode(self) -> None:
        seqs = list(self._running)
        try:
            logits = self.engine.decode(
                [s.generated[-1] for s in seqs], [s.position for s in seqs], [s.slot for s in seqs]
            )
            greedy = argmax(logits).tolist()
        except Exception as exc:
            log.exception("a decode step of %d sequences failed", len(seqs))
            for seq in seqs:
                self._finish(seq, self._error_output(seq, exc))
            return
        for i, seq in enumerate(seqs):
            seq.position += 1
            self._next_token(seq, logits, i, greedy[i])

    def _prefill(self, batch: list[_Sequence]) -> None:
        try:
            slots, logits = self.engine.prefill([s.prompt_ids for s in batch])
            greedy = argmax(logits).tolist()
        except Exception as exc:
            if len(batch) > 1:  # find the prompt that raises; the others run
                for seq in batch:
                    self._prefill([seq])
                return
            log.exception("the prefill of one request failed")
            self._emit(batch[0], self._error_output(batch[0], exc))
            self.observer.finished("error", time.perf_counter() - batch[0].arrival)
            return
        for i, (seq, slot) in enumerate(zip(batch, slots, strict=True)):
            seq.slot, seq.position = slot, len(seq.prompt_ids)
            with self._cond:
                self._running.append(seq)
            self._next_token(seq, logits, i, greedy[i])

    def _next_token(self, seq: _Sequence, logits: torch.Tensor, row: int, greedy: int) -> None:
        try:
            token = greedy if seq.params.sampling.greedy else self._sample(seq, logits[row : row + 1])
            self._advance(seq, token)
        except Exception as exc:
            log.exception("request %d failed", seq.number)
            self._finish(seq, self._error_output(seq, exc))

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        if seq.generator is None:
            seq.generator = seq.params.sampling.generator(logits.device)
        return int(sample(logits, seq.params.sampling, seq.generator)[0])

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Record one new token of a running sequence, report it, and end the sequence if it is done."""
        now = time.perf_counter()
        first = not seq.generated
        seq.generated.append(token)
        self.observer.token(first, now - (seq.arrival if first else seq.last_token_time))
        seq.last_token_time = now
        finish = None
        if token in seq.stop_token_ids:
            finish = "stop"
        elif len(seq.generated) >= seq.params.max_tokens:
            finish = "length"
        text, hit_stop = self._text_delta(seq, finish is not None)
        if hit_stop:
            finish = "stop"
        out = Output(text, [token], len(seq.prompt_ids), len(seq.generated), finish)
        if finish is None:
            self._emit(seq, out)
        else:
            self._finish(seq, out)

    def _text_delta(self, seq: _Sequence, final: bool) -> tuple[str, bool]:
        """The text the new token adds and whether a stop string ended it. Text that could be the
        start of a stop string, or an incomplete UTF-8 sequence, is held back until it is settled."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return "", False
        with self._tokenizer_lock:
            full = tokenizer.decode(seq.generated, skip_special_tokens=True)
        sent = len(seq.text)
        stops = seq.params.stop
        if stops:
            start = max(0, sent - max(len(s) for s in stops) + 1)
            hits = [i for i in (full.find(s, start) for s in stops) if i >= 0]
            if hits:
                end = max(min(hits), sent)
                seq.text += full[sent:end]
                return full[sent:end], True
        end = len(full)
        if not final:
            if full.endswith("\ufffd"):
                end = sent
            else:
                end -= _stop_prefix_len(full, stops)
        end = max(end, sent)
        delta = full[sent:end]
        seq.text += delta
        return delta, False

    def _finish(self, seq: _Sequence, out: Output) -> None:
        if seq.slot >= 0:
            self.engine.release([seq.slot])
            seq.slot = -1
        with self._cond:
            if seq in self._running:
                self._running.remove(seq)
        self._emit(seq, out)
        self.observer.finished(out.finish_reason or "error", time.perf_counter() - seq.arrival)

    def _emit(self, seq: _Sequence, out: Output) -> None:
        try:
            seq.sink(out)
        except Exception:
            log.exception("the sink of request %d failed; cancelling it", seq.number)
            seq.cancelled = True

    @staticmethod
    def _error_output(seq: _Sequence, exc: BaseException) -> Output:
        return Output("", [], len(seq.prompt_ids), len(seq.generated), "error", f"{type(exc).__name__}: {exc}")


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


__all__ = [
    "NotAcceptingError",
    "Observer",
    "Output",
    "QueueFullError",
    "RequestHandle",
    "RequestParams",
    "Scheduler",
]
