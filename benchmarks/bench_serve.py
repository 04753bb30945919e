"""Load generator for `oiv2compile serve`: request throughput, output tokens/s, TTFT and inter-token
latency percentiles, failures, at one or more numbers of concurrent clients.

Each run sends `--requests` streaming completions from N concurrent clients (`--clients 1,8,32,64`:
one run per count; `--requests 32,128,256,256` gives each run its own count, so that one client
is not left running 256 requests in sequence). Request arrival times follow a Poisson process at `--rate` requests/s (`inf`:
each client sends its next request as soon as its last one ends). Prompts are random token ids
(`--prompt-len` tokens on average) and every request asks for `--output-len` tokens on average
with `ignore_eos`, so the lengths are exactly what was drawn: uniform within ±`--spread` of the
mean, as vLLM's random dataset does. TTFT is from sending a request to its first token; ITL the
gaps between its following streamed chunks (the server streams one per decode step, with the
token's text and id; the id alone where the artifact has no tokenizer).

    oiv2compile serve out/llama-8b --max-queue 1024 &
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --clients 1,8,32,64 \\
        --requests 32,128,256,256 --prompt-len 128 --output-len 128 --out benchmarks/results/serve-llama-8b

or let it start the server (and stop it at the end): `--serve out/llama-8b`. Prints a markdown
table and writes serve.json (every figure, the setup, the machine, the commit from OIV2_COMMIT or git) to
--out after every run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from oiv2compile.bench import environment


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = float("nan")
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {response.status_code}: {text[:200]}")
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                # A chunk per step: its text, or its token ids where the artifact has no tokenizer.
                if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("token_ids")):
                    stamps.append(time.perf_counter())
            if not done:
                return RequestResult(False, error="the stream ended without [DONE]")
    except httpx.HTTPError as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not stamps:
        return RequestResult(False, error="no tokens")
    itl = [b - a for a, b in itertools.pairwise(stamps)]
    return RequestResult(True, tokens, stamps[0] - start, itl, end - start)


async def run_load(args: argparse.Namespace, clients: int, requests: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)

    def draw(mean: int) -> int:
        return max(1, round(rng.uniform(mean * (1 - args.spread), mean * (1 + args.spread))))

    jobs = [
        ([rng.randrange(1, args.token_range) for _ in range(draw(args.prompt_len))], draw(args.output_len))
        for _ in range(requests)
    ]
    # Poisson arrivals: exponential gaps at the given rate; every request is due at once at rate inf.
    due, t = [], 0.0
    for _ in jobs:
        due.append(t)
        if math.isfinite(args.rate):
            t += rng.expovariate(args.rate)
    results: list[RequestResult] = []
    next_job = iter(range(len(jobs)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as client:
        start = time.perf_counter()

        async def worker() -> None:
            for i in next_job:
                wait = start + due[i] - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                prompt, max_tokens = jobs[i]
                results.append(await one_request(client, args.model, prompt, max_tokens))

        await asyncio.gather(*(worker() for _ in range(clients)))
        duration = time.perf_counter() - start
    good = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in good]
    itl = [g * 1e3 for r in good for g in r.itl_s]
    output = sum(r.output_tokens for r in good)
    row: dict[str, Any] = {
        "clients": clients,
        "requests": len(results),
        "failed": len(results) - len(good),
        "duration_s": duration,
        "request_throughput": len(good) / duration,
        "output_tokens_per_s": output / duration,
        "mean_latency_s": statistics.fmean(r.latency_s for r in good) if good else float("nan"),
    }
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl)):
        for q in (50, 95, 99):
            row[f"{name}_p{q}"] = percentile(values, q)
    row["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return row


def start_server(artifact: str, port: int, max_queue: int) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "oiv2compile", "serve", artifact, "--port", str(port), "--max-queue", str(max_queue)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline() if proc.stderr else ""
    found = re.search(r"http://\S+", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip()}")
    url = found.group(0)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server was not healthy within 10 minutes")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | requests | failed | req/s | output tok/s | TTFT p50 / p95 / p99 (ms) | ITL p50 / p95 / p99 (ms) |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['request_throughput']:.2f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['ttft_ms_p50']:.1f} / {r['ttft_ms_p95']:.1f} / {r['ttft_ms_p99']:.1f} | "
            f"{r['itl_ms_p50']:.2f} / {r['itl_ms_p95']:.2f} / {r['itl_ms_p99']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(args: argparse.Namespace, machine: dict[str, Any], rows: list[dict[str, Any]], complete: bool) -> None:
    """serve.json (setup, machine, commit, rows) and serve.md (the table) in args.out."""
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    setup["rate"] = "inf" if math.isinf(args.rate) else args.rate
    report = {
        "setup": setup,
        "environment": machine,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": complete,
        "rows": rows,
    }
    (args.out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serve.md").write_text(markdown(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", metavar="ARTIFACT", help="start `oiv2compile serve ARTIFACT` and measure it")
    parser.add_argument("--port", type=int, default=0, help="with --serve: the port (default: a free one)")
    parser.add_argument("--model", help="the model id (default: the server's only model)")
    parser.add_argument("--clients", default="1,8,32,64", help="concurrent clients, one run each (default: 1,8,32,64)")
    parser.add_argument(
        "--requests",
        default="256",
        help="requests per run: one count, or one per --clients entry (default: 256)",
    )
    parser.add_argument("--rate", type=float, default=math.inf, help="Poisson arrival rate, requests/s (default: inf)")
    parser.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (default: 128)")
    parser.add_argument("--output-len", type=int, default=128, help="mean output tokens (default: 128)")
    parser.add_argument("--spread", type=float, default=0.25, help="lengths uniform within ±spread of the mean")
    parser.add_argument("--token-range", type=int, default=1000, help="prompt token ids drawn from [1, N)")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent before the first run, unmeasured")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it counts as failed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write serve.json and serve.md here")
    args = parser.parse_args()
    if not 0 <= args.spread < 1:
        parser.error("--spread must be in [0, 1)")
    client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    request_counts = [int(r) for r in args.requests.split(",") if r.strip()]
    if len(request_counts) == 1:
        request_counts *= len(client_counts)
    if len(request_counts) != len(client_counts) or min(request_counts + client_counts) < 1:
        parser.error("--requests takes one positive count or one per --clients entry")

    proc = None
    rows: list[dict[str, Any]] = []
    machine = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # once, not per run
    if args.serve:
        proc, args.url = start_server(args.serve, args.port, max(1024, *request_counts))
    try:
        if args.model is None:
            args.model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "rate": math.inf})
            asyncio.run(run_load(warm, min(args.warmup, 4), args.warmup, args.seed + 1))
        for clients, requests in zip(client_counts, request_counts, strict=True):
            row = asyncio.run(run_load(args, clients, requests, args.seed))
            rows.append(row)
            print(
                f"clients {clients}: {row['output_tokens_per_s']:.1f} output tok/s, {row['failed']} failed",
                file=sys.stderr,
            )
            if args.out:  # after every run, so a run stopped at a time limit keeps what it measured
                write_report(args, machine, rows, complete=len(rows) == len(client_counts))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    print(markdown(rows), end="")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
