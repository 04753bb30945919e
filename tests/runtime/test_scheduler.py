"""The continuous-batching scheduler and the engine's step-level calls it drives (llama-tiny)."""

from __future__ import annotations

import queue
from typing import Any

import pytest

import oiv2compile
from oiv2compile.errors import InvalidRequestError
from oiv2compile.runtime.sampling import SamplingParams
from oiv2compile.runtime.scheduler import (
    NoObserver,
    NotAcceptingError,
    Output,
    QueueFullError,
    RequestParams,
    Scheduler,
)
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def engine(artifacts):  # type: ignore[no-untyped-def]
    return oiv2compile.load(artifacts("llama-tiny"))


class _Recorder(NoObserver):
    def __init__(self) -> None:
        self.running: list[int] = []

    def step(self, running: int, waiting: int, slots_in_use: int) -> None:
        self.running.append(running)


def _collect(outputs: queue.Queue[Output]) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    while True:
        out = outputs.get(timeout=30)
        tokens += out.token_ids
        if out.finish_reason is not None:
            return tokens, out.finish_reason


def test_step_calls_equal_generate_and_hold_slots(engine):
    want = [r.token_ids for r in engine.generate(PROMPTS[:2], max_new_tokens=6, stop_token_ids=[])]
    slots, logits = engine.prefill(PROMPTS[:2])
    assert slots == [0, 1] and engine.free_slots == 2
    tokens = logits.argmax(-1).tolist()
    got = [[t] for t in tokens]
    positions = [len(p) for p in PROMPTS[:2]]
    for _ in range(5):
        tokens = engine.decode(tokens, positions, slots).argmax(-1).tolist()
        positions = [p + 1 for p in positions]
        for row, token in zip(got, tokens, strict=True):
            row.append(token)
    assert got == want
    with pytest.raises(InvalidRequestError, match="3 sequences need cache rows but 2 of 4 are free"):
        engine.prefill(PROMPTS)
    engine.release(slots)
    assert engine.free_slots == 4
    with pytest.raises(ValueError, match="not held"):
        engine.release([0])


def test_continuous_batching_equals_generate(engine):
    prompts = [[i + 1, 2 * i + 3, 7, i] for i in range(7)]  # 7 requests on 4 slots, different lengths
    lengths = [3, 9, 5, 12, 4, 8, 6]
    want = [
        engine.generate([p], max_new_tokens=n, stop_token_ids=[])[0].token_ids
        for p, n in zip(prompts, lengths, strict=True)
    ]
    scheduler = Scheduler(engine)  # the engine is the worker's from here on
    scheduler.start()
    sinks = []
    for prompt, n in zip(prompts, lengths, strict=True):
        sink: queue.Queue[Output] = queue.Queue()
        scheduler.submit(prompt, RequestParams(max_tokens=n, stop_token_ids=frozenset()), sink.put)
        sinks.append(sink)
    assert [_collect(sink) for sink in sinks] == [(w, "length") for w in want]
    scheduler.stop()
    assert scheduler.state == Scheduler.STOPPED and engine.free_slots == 4
    with pytest.raises(NotAcceptingError):
        scheduler.submit([1, 2], RequestParams(max_tokens=1), print)


def test_priority_then_arrival_and_the_prefill_budget(engine):
    recorder = _Recorder()
    # Prompts of 7 tokens and a budget of 8: one prefill per step while slots are free.
    scheduler = Scheduler(engine, prefill_token_budget=8, max_queue=6, observer=recorder)
    order: list[str] = []

    def sink(name: str) -> Any:
        def put(out: Output) -> None:
            if out.completion_tokens == 1 and out.token_ids:
                order.append(name)

        return put

    params = RequestParams(max_tokens=6, stop_token_ids=frozenset())
    for name in "abcde":
        scheduler.submit([5, 17, 99, 3, 250, 41, 7], params, sink(name))
    scheduler.submit(
        [5, 17, 99, 3, 250, 41, 8], RequestParams(max_tokens=6, stop_token_ids=frozenset(), priority=1), sink("urgent")
    )
    with pytest.raises(QueueFullError, match="the limit is 6"):
        scheduler.submit([1], params, sink("late"))
    scheduler.start()
    scheduler.stop()  # drains
    assert order == ["urgent", "a", "b", "c", "d", "e"]
    assert recorder.running[:4] == [1, 2, 3, 4]  # one admission per step, decodes running meanwhile


def test_stop_tokens_sampling_and_cancelling(engine):
    free = engine.generate([PROMPTS[0]], max_new_tokens=12, stop_token_ids=[])[0].token_ids
    scheduler = Scheduler(engine)
    stopped: queue.Queue[Output] = queue.Queue()
    scheduler.submit(PROMPTS[0], RequestParams(max_tokens=12, stop_token_ids=frozenset([free[4]])), stopped.put)
    sampled = []
    for _ in range(2):
        sink: queue.Queue[Output] = queue.Queue()
        sampling = SamplingParams(temperature=0.9, top_k=20, seed=3)
        scheduler.submit(
            PROMPTS[1], RequestParams(max_tokens=8, sampling=sampling, stop_token_ids=frozenset()), sink.put
        )
        sampled.append(sink)
    waiting: queue.Queue[Output] = queue.Queue()
    handle = scheduler.submit(PROMPTS[2], RequestParams(max_tokens=8), waiting.put)
    handle.cancel()
    scheduler.start()
    assert _collect(stopped) == (free[: free.index(free[4]) + 1], "stop")
    assert _collect(sampled[0]) == _collect(sampled[1])  # per-request generators: same seed, same tokens
    assert _collect(waiting) == ([], "cancelled")
    scheduler.stop()
    assert engine.free_slots == 4
