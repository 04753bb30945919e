"""Where one decode step's time goes (GPU): the kernels of a step, from torch.profiler, for one or more
artifacts in the same run (for example the default build and one with --no-fuse-qkv --no-fuse-ffn
--no-fuse-norms, to see what the fusions changed).

For each artifact: a random prompt of --prompt-len tokens is prefilled into --batch cache rows, then
--warmup decode steps run and --steps more run under the profiler, through `Engine.decode` as
generate and the server call it (CUDA-graph replay where the artifact captured graphs). Reported per
step: every kernel's time and calls, the kernels grouped by what they do, the sum of kernel time
against the step's wall time (the rest is launch gaps and host work), and the weight and KV bytes a
step must read against the copy bandwidth measured in the same run (the roofline share). Then where
the kernels meet: for each pair of kinds in a row (a quantized linear after attention, ...), how many
such boundaries a step has and the time from one kernel's end to the next one's start, summed over
the step (negative where the next starts early, as a programmatic dependent does), from the middle
profiled step's kernels in the order they ran.

    PYTHONPATH=. python benchmarks/profile_decode.py out/llama-8b out/llama-8b-unfused --out prof.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import oiv2compile
from oiv2compile.bench import copy_bandwidth_gbs, environment
from oiv2compile.runtime.sampling import argmax

# What a kernel does, from its name (first match wins): ours, then cuBLAS/CUTLASS products, then
# Inductor's generated kernels (pointwise, reduction, persistent reduction).
CATEGORIES = [
    (
        "quantized linear",
        re.compile(
            r"_quant_matmul|linear_int8_gemv|gemv_int8_kernel|int4_mma_kernel|int4_mma_streamed|int4_mma_dequant"
        ),
    ),
    ("attention", re.compile(r"_attention")),
    ("kv write", re.compile(r"kv_write")),
    ("add + rms norm", re.compile(r"add_rms_norm")),
    ("gated activation", re.compile(r"gated_act")),
    ("matrix product (cuBLAS/CUTLASS)", re.compile(r"gemv|gemm|cutlass|cublas|nvjet|sm90_|sm80_|splitK", re.I)),
    ("Inductor fused (pointwise/reduction)", re.compile(r"^triton_(poi|red|per)_")),
    ("copies and fills", re.compile(r"copy|fill|memcpy|memset", re.I)),
]


def category(kernel: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(kernel):
            return name
    return "other"


def boundaries(kernels: list[tuple[str, float, float]]) -> list[dict[str, Any]]:
    """Kernels (name, start us, end us) of one step → per pair of kinds in a row ("before → after"): the
    count, the summed gap from the one's end to the next's start (us; negative: they overlap) and the
    summed positive part alone, largest positive part first."""
    ordered = sorted(kernels, key=lambda k: k[1])
    pairs: dict[str, dict[str, Any]] = {}
    for (before, _, end), (after, start, _) in itertools.pairwise(ordered):
        key = f"{category(before)} → {category(after)}"
        entry = pairs.setdefault(key, {"pair": key, "count": 0, "gap_us": 0.0, "idle_us": 0.0})
        entry["count"] += 1
        entry["gap_us"] += start - end
        entry["idle_us"] += max(0.0, start - end)
    return sorted(pairs.values(), key=lambda e: -e["idle_us"])


def profile_artifact(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    engine = oiv2compile.load(path)
    device = engine.device
    gen = torch.Generator().manual_seed(0)
    high = min(engine.vocab_size, 30000)
    prompts = [torch.randint(1, high, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    steps_total = args.warmup + args.steps
    if args.prompt_len + steps_total > engine.max_seq_len:
        raise SystemExit(f"{path}: --prompt-len plus the steps exceed the artifact's max_seq_len {engine.max_seq_len}")
    slots, logits = engine.prefill(prompts)
    tokens = argmax(logits)
    position = args.prompt_len

    def step() -> None:
        nonlocal tokens, position
        positions = torch.full((args.batch,), position, dtype=torch.long, device=device)
        tokens = argmax(engine.decode(tokens, positions, slots))
        position += 1

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps  # without the profiler's overhead

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize(device)
    engine.release(slots)

    kernels: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "calls": 0})
    timeline = []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        timeline.append((event.name, float(event.time_range.start), float(event.time_range.end)))
        entry = kernels[event.name]
        entry["us"] += event.device_time_total / args.steps  # a device event's own duration, us
        entry["calls"] += 1 / args.steps
    kernel_us = sum(k["us"] for k in kernels.values())
    timeline.sort(key=lambda k: k[1])
    per_step = len(timeline) // args.steps
    middle = timeline[per_step * (args.steps // 2) : per_step * (args.steps // 2 + 1)]
    groups: dict[str, float] = defaultdict(float)
    for name, k in kernels.items():
        groups[category(name)] += k["us"]

    weight_bytes = int(engine.manifest["weights"]["bytes"])
    filled = args.prompt_len + args.warmup + args.steps / 2
    kv_bytes = args.batch * filled * engine.spec.bytes_per_token()
    return {
        "artifact": str(path),
        "build_config": engine.manifest.get("build_config"),
        "batch": args.batch,
        "step_ms": step_s * 1e3,
        "tokens_per_s": args.batch / step_s,
        "kernel_us_per_step": kernel_us,
        "kernels_per_step": sum(k["calls"] for k in kernels.values()),
        "bytes_per_step": weight_bytes + kv_bytes,
        "kernels": sorted(({"name": n, **k} for n, k in kernels.items()), key=lambda k: -k["us"]),
        "categories": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "boundaries": boundaries(middle),
    }


def markdown(report: dict[str, Any], top: int) -> str:
    bw = report["copy_bandwidth_gbs"]
    lines = []
    for r in report["artifacts"]:
        achieved = r["bytes_per_step"] / (r["step_ms"] / 1e3) / 1e9
        lines += [
            f"#### {r['artifact']} (batch {r['batch']})",
            "",
            f"Step {r['step_ms'] * 1e3:.1f} us ({r['tokens_per_s']:.1f} tok/s); kernels {r['kernel_us_per_step']:.1f} us "
            f"in {r['kernels_per_step']:.0f} launches ({r['kernel_us_per_step'] / (r['step_ms'] * 1e3):.0%} of the "
            f"step); {r['bytes_per_step'] / 1e9:.3f} GB read per step = {achieved:.0f} GB/s, "
            f"{achieved / bw:.0%} of the copy bandwidth ({bw:.0f} GB/s).",
            "",
            "| what | us / step | share of kernel time |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {us:.1f} | {us / r['kernel_us_per_step']:.0%} |" for name, us in r["categories"].items()]
        lines += ["", "| kernel | us / step | calls / step |", "|---|---:|---:|"]
        lines += [f"| `{k['name'][:90]}` | {k['us']:.1f} | {k['calls']:.0f} |" for k in r["kernels"][:top]]
        lines += [
            "",
            "| kernels in a row (middle step) | count | gap us, summed | idle us, summed |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {b['pair']} | {b['count']} | {b['gap_us']:.1f} | {b['idle_us']:.1f} |" for b in r["boundaries"][:top]
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path, help="artifact folders, profiled one after another")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="decode steps profiled (default: 20)")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per artifact (default: 15)")
    parser.add_argument("--out", type=Path, help="write the report (JSON) here, and the table next to it (.md)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    report: dict[str, Any] = {
        "environment": environment(device),
        "copy_bandwidth_gbs": copy_bandwidth_gbs(device),
        "setup": {k: v for k, v in vars(args).items() if k not in ("artifacts", "out")},
        "artifacts": [],
    }
    for path in args.artifacts:
        report["artifacts"].append(profile_artifact(path, args))
        torch.cuda.empty_cache()
    table = markdown(report, args.top)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
