"""The HTTP layer: OpenAI-compatible endpoints over the scheduler, with FastAPI and uvicorn.

The event loop never touches the engine. A request is tokenized and queued with
`Scheduler.submit` (bad input, a full queue or a draining server are refused right there); the
scheduler's worker thread hands each step's output back to the loop with `call_soon_threadsafe`
into the request's asyncio queue. A streaming response that ends early (the client went away, or
the send failed) cancels its request, which frees its cache slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from oiv2compile.errors import InvalidRequestError
from oiv2compile.runtime.sampling import SamplingParams
from oiv2compile.runtime.scheduler import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_TOKEN_BUDGET,
    NotAcceptingError,
    Output,
    QueueFullError,
    RequestHandle,
    RequestParams,
    Scheduler,
)
from oiv2compile.serve.metrics import Metrics
from oiv2compile.serve.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, error_body, usage

log = logging.getLogger(__name__)

# How often a request waiting for its next token checks whether its client is still there.
_DISCONNECT_POLL_S = 0.5

Loader = Callable[[Metrics], Scheduler]


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.reason = status, message, kind, reason


class _ClientGone(Exception):
    pass


@dataclass
class _State:
    model_name: str
    metrics: Metrics
    scheduler: Scheduler | None = None
    load_error: str | None = None


def create_app(load: Loader, model_name: str, max_slots: int) -> FastAPI:
    """An app whose scheduler comes from `load(metrics)`, called on a thread at startup so that
    /health answers (503) while the artifact loads. The scheduler is drained at shutdown."""
    state = _State(model_name=model_name, metrics=Metrics(max_slots))

    def load_in_background() -> None:
        try:
            state.scheduler = load(state.metrics)
        except Exception as exc:
            log.exception("loading the artifact failed")
            state.load_error = f"{type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load_in_background, name="oiv2-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop, True)

    app = FastAPI(title="oiv2compile", lifespan=lifespan)
    app.state.oiv2 = state

    @app.exception_handler(_HTTPError)
    async def http_error(request: Request, exc: _HTTPError) -> JSONResponse:
        if exc.reason:
            state.metrics.reject(exc.reason)
        return JSONResponse(error_body(exc.message, exc.kind, exc.status), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        state.metrics.reject("invalid_request")
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("The request body is not valid JSON.", "invalid_request_error", 400), 400)
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return JSONResponse(error_body(message, "invalid_request_error", 422), 422)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, detail = _health(state)
        return JSONResponse({"status": status, **detail}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.scheduler is not None:
            stats = state.scheduler.stats()
            state.metrics.step(stats["running"], stats["waiting"], stats["slots_in_use"])
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "oiv2compile"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        scheduler = _ready(state, body.model, body.unsupported())
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise _HTTPError(400, "Give one prompt per request.", "invalid_request_error", "invalid_request")
            prompt = prompt[0]
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        return await _generate(state, scheduler, request, body, prompt, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        scheduler = _ready(state, body.model, body.unsupported())
        prompt = render_chat(scheduler.engine.tokenizer, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as vLLM: whatever the cache row has left after the prompt
            ids = _submit_errors(state, lambda: scheduler.tokenize(prompt))
            max_tokens = max(1, scheduler.engine.max_seq_len - len(ids))
        return await _generate(state, scheduler, request, body, prompt, max_tokens, chat=True)

    return app


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The prompt of a chat: the tokenizer's chat template, or where it has none, one line
    `role: content` per message followed by `assistant:` (documented in the README)."""
    if tokenizer is None:
        raise _HTTPError(
            400,
            "This artifact has no tokenizer, so it cannot serve chat; use /v1/completions with token ids.",
            "invalid_request_error",
            "invalid_request",
        )
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True))
    return "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"


def _health(state: _State) -> tuple[str, dict[str, Any]]:
    if state.load_error is not None:
        return "failed", {"error": state.load_error}
    scheduler = state.scheduler
    if scheduler is None:
        return "loading", {}
    if scheduler.state == Scheduler.FAILED:
        return "failed", {"error": scheduler.error}
    if scheduler.state != Scheduler.RUNNING:
        return scheduler.state, {}
    return "ok", scheduler.stats()


def _ready(state: _State, model: str, unsupported: str | None) -> Scheduler:
    status, _ = _health(state)
    if status != "ok" or state.scheduler is None:
        raise _HTTPError(
            503, f"The server is {status}; retry when /health says ok.", "service_unavailable", "not_ready"
        )
    if model != state.model_name:
        raise _HTTPError(
            404, f"Model {model!r} is not served here; use {state.model_name!r}.", "not_found_error", "invalid_request"
        )
    if unsupported:
        raise _HTTPError(400, unsupported, "invalid_request_error", "invalid_request")
    return state.scheduler


def _submit_errors(state: _State, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except InvalidRequestError as exc:
        raise _HTTPError(400, str(exc), "invalid_request_error", "invalid_request") from None
    except QueueFullError as exc:
        raise _HTTPError(429, str(exc), "rate_limit_error", "queue_full") from None
    except NotAcceptingError as exc:
        raise _HTTPError(503, str(exc), "service_unavailable", "not_ready") from None


class _Request:
    """One request's side of the hand-over: the asyncio queue its outputs arrive in."""

    def __init__(self, http: Request) -> None:
        self.http = http
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.handle: RequestHandle | None = None
        self.done = False
        self._get: asyncio.Future[Output] | None = None

    def sink(self, out: Output) -> None:  # the worker thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def next(self) -> Output:
        while True:
            if self._get is None:
                self._get = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._get}, timeout=_DISCONNECT_POLL_S)
            if done:
                out = self._get.result()
                self._get = None
                if out.finish_reason is not None:
                    self.done = True
                return out
            if await self.http.is_disconnected():
                raise _ClientGone

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()
        if not self.done and self.handle is not None:
            self.handle.cancel()
            self.done = True


class _Stream(StreamingResponse):
    """A stream that cancels its request however it ends (finished, client gone, send failed)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _generate(
    state: _State,
    scheduler: Scheduler,
    http: Request,
    body: CompletionRequest | ChatCompletionRequest,
    prompt: Any,
    max_tokens: int,
    *,
    chat: bool,
) -> Response:
    params = RequestParams(
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p if body.top_p < 1.0 else None,
            seed=body.seed,
        ),
        stop_token_ids=frozenset() if body.ignore_eos else None,
        stop=body.stop_strings(),
        priority=body.priority,
    )
    request = _Request(http)
    request.handle = _submit_errors(state, lambda: scheduler.submit(prompt, params, request.sink))
    prompt_tokens = request.handle.prompt_tokens
    prefix = "chatcmpl" if chat else "cmpl"
    ident, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "created": created, "model": state.model_name}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _sse(request, head, chat, prompt_tokens, include_usage)
        return _Stream(events, request.close)

    text, token_ids, out = [], [], None
    try:
        while out is None or out.finish_reason is None:
            out = await request.next()
            text.append(out.text)
            token_ids += out.token_ids
    except _ClientGone:
        return Response(status_code=499)
    finally:
        request.close()
    if out.finish_reason == "error":
        return JSONResponse(error_body(f"The request failed: {out.error}", "server_error", 500), status_code=500)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}}
        obj = "chat.completion"
    else:
        # token_ids (an extension, as in vLLM): the only output of an artifact without a tokenizer
        choice = {"index": 0, "text": "".join(text), "token_ids": token_ids}
        obj = "text_completion"
    choice.update(logprobs=None, finish_reason=out.finish_reason)
    return JSONResponse(
        {**head, "object": obj, "choices": [choice], "usage": usage(prompt_tokens, out.completion_tokens)}
    )


async def _sse(
    request: _Request, head: dict[str, Any], chat: bool, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, token_ids: list[int] | None = None, *, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or "", "token_ids": token_ids or []}
        choice.update(logprobs=None, finish_reason=finish)
        return "data: " + json.dumps({**head, "object": obj, "choices": [choice]}) + "\n\n"

    if chat:
        yield chunk(None, None, role=True)
    completion_tokens = 0
    try:
        while True:
            out = await request.next()
            completion_tokens = out.completion_tokens
            if out.finish_reason == "error":
                err = error_body(f"The request failed: {out.error}", "server_error", 500)
                yield "data: " + json.dumps(err) + "\n\n"
                break
            if out.finish_reason == "cancelled":
                return
            # A completion streams a chunk per step even where the step adds no text (no tokenizer,
            # or text held back while a stop string may start): its token ids are in it.
            if out.text or out.finish_reason or (out.token_ids and not chat):
                yield chunk(out.text, out.finish_reason, out.token_ids)
            if out.finish_reason:
                break
    except _ClientGone:
        return
    if include_usage:
        yield (
            "data: "
            + json.dumps({**head, "object": obj, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            + "\n\n"
        )
    yield "data: [DONE]\n\n"


def serve(
    artifact: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = DEFAULT_MAX_QUEUE,
    prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
    model_name: str | None = None,
    device: str | None = None,
) -> None:
    """Serve an artifact until SIGINT or SIGTERM; SIGTERM drains the running requests first."""
    import uvicorn

    import oiv2compile
    from oiv2compile.errors import Oiv2Error
    from oiv2compile.runtime.artifact import read_manifest

    root = Path(artifact)
    manifest = read_manifest(root)  # a missing or broken artifact fails here, before the server starts
    name = model_name or root.resolve().name
    max_slots = int(manifest["cache"]["max_batch_size"])

    def load(metrics: Metrics) -> Scheduler:
        engine = oiv2compile.load(root, device=device)
        scheduler = Scheduler(engine, max_queue=max_queue, prefill_token_budget=prefill_token_budget, observer=metrics)
        scheduler.start()
        log.info("serving %s", root)
        return scheduler

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections from now on wait in the backlog until uvicorn runs
    except OSError as exc:
        raise Oiv2Error(f"Cannot listen on {host}:{port} ({exc.strerror}); pick another --host or --port.") from None
    bound = sock.getsockname()[1]
    print(f"oiv2compile: serving {name} on http://{host}:{bound} (health: /health)", file=sys.stderr, flush=True)
    app = create_app(load, name, max_slots)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM (no new connections; open ones finish; then the app's shutdown
    # drains the scheduler) and then raises the signal again to the handler it replaced. With a
    # no-op handler here that last step does nothing, and a drained server exits with status 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
