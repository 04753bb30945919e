"""`oiv2compile serve` on a live loopback server with the bundled tinycode: the OpenAI endpoints
through the `openai` client, equality with Engine.generate under batching, every fault of the issue,
metrics, and a bounded load test."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import uvicorn

import oiv2compile
from oiv2compile.runtime.scheduler import QueueFullError, RequestParams, Scheduler
from oiv2compile.serve import create_app, render_chat
from oiv2compile.serve.protocol import ChatMessage

PROMPTS = [
    "def add(a, b):",
    "import os\n",
    "class Stack:\n    def push(self",
    "for i in range(",
    "x = [",
    "def fibonacci(n):\n    if n",
    "print(",
    "while True:\n",
]


class LiveServer:
    """uvicorn on 127.0.0.1 (an ephemeral port) in a thread of the test process."""

    def __init__(self, load: Callable[[Any], Scheduler], max_slots: int) -> None:
        self.app = create_app(load, "tinycode", max_slots)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    @property
    def scheduler(self) -> Scheduler:
        return self.app.state.oiv2.scheduler

    def wait_health(self, status: int = 200) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            response = httpx.get(f"{self.url}/health")
            if response.status_code == status or time.monotonic() > deadline:
                assert response.status_code == status, response.text
                return response.json()
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        for line in text.splitlines():
            if line.startswith(f"{name}{want} "):
                return float(line.split()[-1])
        return 0.0


def _started(engine: Any) -> Callable[[Any], Scheduler]:
    def load(metrics: Any) -> Scheduler:
        scheduler = Scheduler(engine, observer=metrics)
        scheduler.start()
        return scheduler

    return load


@pytest.fixture(scope="module")
def tinycode(artifacts):  # type: ignore[no-untyped-def]
    return artifacts("tinycode")


@pytest.fixture(scope="module")
def reference(tinycode):  # type: ignore[no-untyped-def]
    """A second engine for Engine.generate's answers (the server's engine belongs to its worker)."""
    return oiv2compile.load(tinycode)


@pytest.fixture(scope="module")
def server(tinycode) -> Iterator[LiveServer]:  # type: ignore[no-untyped-def]
    engine = oiv2compile.load(tinycode)
    with LiveServer(_started(engine), engine.max_batch_size) as live:
        live.wait_health()
        yield live


@pytest.fixture
def client(server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(reference: Any, prompt: Any, n: int) -> Any:
    return reference.generate([prompt], max_new_tokens=n)[0]


def test_models_health_and_completion_equal_generate(server, client, reference):
    assert [m.id for m in client.models.list().data] == ["tinycode"]
    assert server.wait_health()["status"] == "ok"
    got = client.completions.create(model="tinycode", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    want = _greedy(reference, PROMPTS[0], 12)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == want.prompt_tokens + len(want.token_ids)


def test_streaming_completion_and_chat(server, client, reference):
    chunks = list(
        client.completions.create(model="tinycode", prompt=PROMPTS[5], max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == _greedy(reference, PROMPTS[5], 10).text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    rendered = render_chat(reference.tokenizer, [ChatMessage(**m) for m in messages])
    assert rendered == "system: You write Python.\nuser: def add(a, b):\nassistant:"  # tinycode has no template
    want = _greedy(reference, rendered, 8)
    full = client.chat.completions.create(model="tinycode", messages=messages, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content == want.text
    assert full.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model="tinycode",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want.text
    assert parts[-1].choices == [] and parts[-1].usage.total_tokens == want.prompt_tokens + 8


def test_sse_wire_format_ends_with_done(server, reference):
    body = {"model": "tinycode", "prompt": [5, 17, 99], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:])["choices"][0] for e in events[:-1]]
    assert chunks[-1]["finish_reason"] == "length"
    # One chunk per decode step, each with its token's id, even where the step adds no text.
    assert [len(c["token_ids"]) for c in chunks] == [1, 1, 1, 1]
    want = _greedy(reference, [5, 17, 99], 4)
    assert [i for c in chunks for i in c["token_ids"]] == list(want.token_ids)
    body["stream"] = False
    full = httpx.post(f"{server.url}/v1/completions", json=body).json()["choices"][0]
    assert full["token_ids"] == list(want.token_ids) and full["text"] == want.text


def test_eight_concurrent_requests_equal_generate_alone(server, client, reference):
    def ask(prompt: str) -> Any:
        return client.completions.create(model="tinycode", prompt=prompt, max_tokens=16, temperature=0)

    with ThreadPoolExecutor(8) as pool:  # 8 requests on 4 cache slots: they queue and batch
        got = list(pool.map(ask, PROMPTS))
    for prompt, response in zip(PROMPTS, got, strict=True):
        want = _greedy(reference, prompt, 16)
        assert response.choices[0].text == want.text
        assert response.usage.completion_tokens == len(want.token_ids)


def test_stop_strings_and_sampling_params(server, client, reference):
    free = _greedy(reference, PROMPTS[0], 16).text
    stop = free[5:7]
    got = client.completions.create(model="tinycode", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == free[: free.index(stop)] and got.choices[0].finish_reason == "stop"
    kwargs = dict(model="tinycode", prompt=PROMPTS[1], max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": [1] * 129, "max_tokens": 1}, 400, "max_seq_len is 128"),
        ({"prompt": [1] * 100, "max_tokens": 40}, 400, "the artifact holds 128"),
        ({"prompt": "x", "max_tokens": 2, "frobnicate": 1}, 422, "frobnicate"),
        ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "x", "n": 2}, 400, "n=2 is not supported"),
        ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
        ({"prompt": [1, 10**9]}, 400, "outside the vocabulary"),
    ],
)
def test_bad_requests(server, body, status, fragment):
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tinycode", **body})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_bad_json_and_unknown_model(server, client):
    response = httpx.post(
        f"{server.url}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_client_disconnect_mid_stream_frees_the_slot(server):
    cancelled = server.metric("oiv2_requests_failed_total", reason="cancelled")
    body = {"model": "tinycode", "prompt": PROMPTS[0], "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.scheduler.stats()["running"] == 1
    deadline = time.monotonic() + 20
    while (
        server.scheduler.stats()["slots_in_use"]
        or server.metric("oiv2_requests_failed_total", reason="cancelled") == cancelled
    ):
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.05)
    assert server.metric("oiv2_requests_failed_total", reason="cancelled") == cancelled + 1


def test_an_exception_in_one_request_fails_only_it(server, client, monkeypatch):
    scheduler = server.scheduler
    advance = scheduler._advance
    poison = scheduler.tokenize(PROMPTS[2])

    def faulty(seq: Any, token: int) -> None:
        if seq.prompt_ids == poison and len(seq.generated) == 3:
            raise RuntimeError("injected fault")
        advance(seq, token)

    monkeypatch.setattr(scheduler, "_advance", faulty)
    errors = server.metric("oiv2_requests_failed_total", reason="error")

    def ask(prompt: str) -> Any:
        try:
            return client.completions.create(model="tinycode", prompt=prompt, max_tokens=12, temperature=0)
        except openai.InternalServerError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, PROMPTS[:4]))
    assert isinstance(got[2], openai.InternalServerError) and "injected fault" in str(got[2])
    assert all(r.usage.completion_tokens == 12 for i, r in enumerate(got) if i != 2)
    assert server.metric("oiv2_requests_failed_total", reason="error") == errors + 1
    monkeypatch.undo()
    assert server.scheduler.stats()["slots_in_use"] == 0
    assert client.completions.create(model="tinycode", prompt=PROMPTS[2], max_tokens=3).usage.completion_tokens == 3


def test_metrics_move(server, client):
    before = {
        name: server.metric(name)
        for name in (
            "oiv2_generation_tokens_total",
            "oiv2_prompt_tokens_total",
            "oiv2_time_to_first_token_seconds_count",
            "oiv2_inter_token_latency_seconds_count",
            "oiv2_e2e_request_latency_seconds_count",
            "oiv2_queue_time_seconds_count",
        )
    }
    got = client.completions.create(
        model="tinycode", prompt=PROMPTS[3], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    after = {name: server.metric(name) for name in before}
    assert after["oiv2_generation_tokens_total"] - before["oiv2_generation_tokens_total"] == 6
    assert after["oiv2_prompt_tokens_total"] - before["oiv2_prompt_tokens_total"] == got.usage.prompt_tokens
    assert after["oiv2_time_to_first_token_seconds_count"] == before["oiv2_time_to_first_token_seconds_count"] + 1
    assert after["oiv2_inter_token_latency_seconds_count"] == before["oiv2_inter_token_latency_seconds_count"] + 5
    assert after["oiv2_e2e_request_latency_seconds_count"] == before["oiv2_e2e_request_latency_seconds_count"] + 1
    assert after["oiv2_queue_time_seconds_count"] == before["oiv2_queue_time_seconds_count"] + 1
    assert server.metric("oiv2_kv_cache_slots") == 4
    assert server.metric("oiv2_requests_finished_total", finish_reason="length") >= 1
    for gauge in ("oiv2_requests_running", "oiv2_requests_waiting", "oiv2_kv_cache_slots_in_use"):
        assert f"\n{gauge} " in httpx.get(f"{server.url}/metrics").text


def test_queue_bound_not_ready_and_failed_health(reference):
    """A scheduler not started yet: /health is 503, requests wait, past max_queue they get 429;
    started, the waiting ones complete; a loop that dies leaves /health at 503."""
    holder: list[Scheduler] = []

    def load(metrics: Any) -> Scheduler:
        holder.append(Scheduler(reference, max_queue=2, observer=metrics))
        return holder[0]

    with LiveServer(load, reference.max_batch_size) as live:
        assert live.wait_health(503)["status"] == "created"
        # While not ready, the endpoints refuse with 503 ...
        refused = httpx.post(f"{live.url}/v1/completions", json={"model": "tinycode", "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503
        # ... so queue into the scheduler directly, as the HTTP layer would once ready.
        outputs: list[Any] = []
        for prompt in PROMPTS[:2]:
            live.scheduler.submit(prompt, _params(4), outputs.append)
        with pytest.raises(QueueFullError, match="already waiting"):
            live.scheduler.submit(PROMPTS[2], _params(4), outputs.append)
        live.scheduler.start()
        assert live.wait_health(200)["status"] == "ok"
        deadline = time.monotonic() + 20
        while sum(o.finish_reason is not None for o in outputs) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Full over HTTP: the worker is held inside the step of a first request while more arrive.
        entered, gate = threading.Event(), threading.Event()
        step = live.scheduler._step

        def held(*args: Any) -> None:
            entered.set()
            gate.wait(20)
            step(*args)

        live.scheduler._step = held  # type: ignore[method-assign]
        body = {"model": "tinycode", "prompt": "x = 1", "max_tokens": 3, "temperature": 0}
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(httpx.post, f"{live.url}/v1/completions", json=body, timeout=60)
            assert entered.wait(20)
            queued = [pool.submit(httpx.post, f"{live.url}/v1/completions", json=body, timeout=60) for _ in range(2)]
            while live.scheduler.stats()["waiting"] < 2:
                time.sleep(0.02)
            full = httpx.post(f"{live.url}/v1/completions", json=body)
            assert full.status_code == 429 and "the limit is 2" in full.json()["error"]["message"]
            live.scheduler._step = step  # type: ignore[method-assign]
            gate.set()
            assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        assert live.metric("oiv2_requests_failed_total", reason="queue_full") == 1

        def broken(*args: Any) -> None:
            raise RuntimeError("the loop broke")

        live.scheduler._step = broken  # type: ignore[method-assign]
        dead = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
        assert dead.status_code == 500 and "the loop broke" in dead.json()["error"]["message"]
        health = live.wait_health(503)
        assert health["status"] == "failed" and "the loop broke" in health["error"]
    assert reference.free_slots == reference.max_batch_size  # a failed loop gives its slots back


def _params(n: int) -> RequestParams:
    return RequestParams(max_tokens=n)


@pytest.mark.timeout(180)
def test_load_200_requests_from_16_clients(server):
    """200 requests from 16 concurrent clients, half streaming: none fails, every one is complete."""
    rng = random.Random(0)
    jobs = [
        {
            "model": "tinycode",
            "prompt": rng.choice(PROMPTS),
            "max_tokens": rng.randint(2, 6),
            "temperature": rng.choice([0.0, 0.8]),
            "seed": i,
            "stream": i % 2 == 0,
        }
        for i in range(200)
    ]

    async def one(client: httpx.AsyncClient, job: dict[str, Any]) -> tuple[str, int]:
        if not job["stream"]:
            response = await client.post("/v1/completions", json=job)
            assert response.status_code == 200, response.text
            body = response.json()
            return body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]
        events = []
        async with client.stream("POST", "/v1/completions", json=job) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    events.append(line)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        return chunks[-1]["choices"][0]["finish_reason"], len(chunks)

    async def run() -> list[tuple[str, int]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(jobs)):
            queue.put_nowait(i)
        results: list[Any] = [None] * len(jobs)

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results[i] = await one(client, jobs[i])

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            await asyncio.gather(*(worker(client) for _ in range(16)))
        return results

    failed_before = sum(
        server.metric("oiv2_requests_failed_total", reason=r) for r in ("error", "cancelled", "queue_full")
    )
    results = asyncio.run(run())
    for job, (finish, n) in zip(jobs, results, strict=True):
        assert finish in ("stop", "length")
        assert 1 <= n <= job["max_tokens"] and (finish == "stop" or n == job["max_tokens"] or job["stream"])
    failed_after = sum(
        server.metric("oiv2_requests_failed_total", reason=r) for r in ("error", "cancelled", "queue_full")
    )
    assert failed_after == failed_before
    assert server.scheduler.stats() == {"running": 0, "waiting": 0, "slots_in_use": 0}


def test_sigterm_drains_running_requests(tinycode):
    """The CLI server, in its own process: SIGTERM lets a running stream finish, then exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "oiv2compile", "serve", str(tinycode), "--port", "0", "--model-name", "tinycode"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        url = re.search(r"http://\S+", line).group(0)  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = {"model": "tinycode", "prompt": PROMPTS[0], "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_without_the_extra_is_one_sentence(monkeypatch, capsys, tinycode):
    from oiv2compile.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", str(tinycode)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("oiv2compile: error: ") and "'serve' extra" in err and err.count("\n") == 0
