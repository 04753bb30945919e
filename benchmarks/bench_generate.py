"""End-to-end generation benchmark: an oiv2compile artifact against Hugging Face in the same run.

For one model (a preset or a HF directory), batch 1 by default, a prompt of --prompt-len random
tokens and --new-tokens greedy new tokens:
  - oiv2compile: build time, load time (ready to generate, CUDA graphs captured), time to first
    token, decode tokens/s (prefill excluded), peak GPU memory;
  - HF eager with its dynamic cache, and HF generate(cache_implementation="static"), which compiles
    itself (its warm-up time is reported);
  - the device-to-device copy bandwidth measured in the same run, and each decode rate as a share of
    the bandwidth roofline: bandwidth / (weight bytes + KV-cache bytes read per step).

Timings: CUDA-synchronised wall clock, warm-up excluded, median of --repeats runs with min-max spread.
HF decode rate = (new_tokens - 1) / (time(new_tokens) - time(1 token)), so prefill is excluded alike.

    python benchmarks/bench_generate.py --model llama-1b --out results/llama-1b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def copy_bandwidth_gbs(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def step_bytes(weight_bytes: int, kv_bytes_per_token: int, batch: int, filled: float) -> float:
    """Bytes one decode step must read: every weight once, and each sequence's filled cache."""
    return weight_bytes + batch * filled * kv_bytes_per_token


def bench_oiv2(model: str, args: argparse.Namespace, prompts: list[list[int]], workdir: Path) -> dict[str, Any]:
    import oiv2compile
    from oiv2compile.capture import CacheSpec

    out = workdir / "artifact"
    start = time.perf_counter()
    oiv2compile.build(
        model,
        out,
        dtype=args.dtype,
        max_batch_size=max(args.batch, 1),
        max_seq_len=args.max_seq_len,
        overwrite=True,
        progress=lambda p, s: print(f"  build: {p} {s:.1f}s", flush=True) if s is not None else None,
    )
    build_s = time.perf_counter() - start
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine = oiv2compile.load(out)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    manifest = engine.manifest
    for _ in range(args.warmup):
        engine.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])
    ttft, decode = [], []
    for _ in range(args.repeats):
        result = engine.generate(prompts, max_new_tokens=args.new_tokens, stop_token_ids=[])[0]
        ttft.append(result.time_to_first_token_s)
        decode.append(args.batch * result.decode_tokens_per_s)
    row = {
        "name": "oiv2compile (inductor, CUDA graphs)",
        "build_s": build_s,
        "load_s": load_s,
        "ttft_s": summary(ttft),
        "decode_tok_s": summary(decode),
        # Peak over what was allocated before the load: what this engine needs, whatever the
        # process held already.
        "peak_gpu_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
        "held_before_gib": before / 2**30,
        "weight_bytes": manifest["weights"]["bytes"],
        "kv_bytes_per_token": CacheSpec.from_dict(manifest["cache"]).bytes_per_token(),
        "phases_s": manifest["phases_s"],
    }
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _hf_generate_s(hf: Any, input_ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    hf.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_hf(model: str, args: argparse.Namespace, prompts: list[list[int]], static: bool) -> dict[str, Any]:
    from oiv2compile.models import load_model

    before = torch.cuda.memory_allocated()
    hf = load_model(model, dtype=getattr(torch, args.dtype), device="cuda", seed=0).model
    input_ids = torch.tensor(prompts, device="cuda")
    kwargs: dict[str, Any] = {"cache_implementation": "static"} if static else {}
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.warmup if not static else max(args.warmup, 2)):
        _hf_generate_s(hf, input_ids, args.new_tokens, **kwargs)
        _hf_generate_s(hf, input_ids, 1, **kwargs)
    warmup_s = time.perf_counter() - start
    ttft, decode = [], []
    for _ in range(args.repeats):
        first = _hf_generate_s(hf, input_ids, 1, **kwargs)
        full = _hf_generate_s(hf, input_ids, args.new_tokens, **kwargs)
        ttft.append(first)
        decode.append(args.batch * (args.new_tokens - 1) / (full - first))
    row = {
        "name": "HF generate, static cache (compiles itself)" if static else "HF eager, dynamic cache",
        "warmup_s": warmup_s,
        "ttft_s": summary(ttft),
        "decode_tok_s": summary(decode),
        "peak_gpu_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
        "held_before_gib": before / 2**30,
    }
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baselines", default="hf-eager,hf-static")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 30000, (args.batch, args.prompt_len), generator=gen).tolist()
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(bench_oiv2(args.model, args, prompts, Path(tmp)))
    ours = rows[0]
    for baseline in filter(None, args.baselines.split(",")):
        rows.append(bench_hf(args.model, args, prompts, static=baseline == "hf-static"))
    filled = args.prompt_len + args.new_tokens / 2  # average filled length over the decode
    per_step = step_bytes(ours["weight_bytes"], ours["kv_bytes_per_token"], args.batch, filled)
    roofline = bandwidth * 1e9 / per_step * args.batch
    for row in rows:
        row["share_of_roofline"] = row["decode_tok_s"]["median"] / roofline
    result = {
        "model": args.model,
        "args": {k: str(v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_gbs": bandwidth,
        "roofline_tok_s": roofline,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(
        f"\n{args.model} {args.dtype} batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"{result['device']}, copy {bandwidth:.0f} GB/s, roofline {roofline:.0f} tok/s"
    )
    print("| what | decode tok/s (min-max) | share of roofline | TTFT ms | build s | load s | warm-up s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        d = row["decode_tok_s"]
        print(
            f"| {row['name']} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {row['share_of_roofline']:.0%} | "
            f"{row['ttft_s']['median'] * 1e3:.1f} | {row.get('build_s', float('nan')):.1f} | "
            f"{row.get('load_s', float('nan')):.2f} | {row.get('warmup_s', float('nan')):.1f} | {row['peak_gpu_gib']:.1f} |"
        )
    speedup = (
        ours["decode_tok_s"]["median"] / max(r["decode_tok_s"]["median"] for r in rows[1:])
        if len(rows) > 1
        else float("nan")
    )
    print(f"oiv2compile decode vs best baseline: {speedup:.2f}x")


def _commit() -> str:
    """The commit measured: OIV2_COMMIT where the tree is a copy without git (the GPU machine)."""
    if os.environ.get("OIV2_COMMIT"):
        return os.environ["OIV2_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
