"""Capture tiny HF models and hand-written modules for the pass tests."""

from __future__ import annotations

import copy

import torch

from oiv2compile.capture import (
    DECODE,
    PREFILL,
    CacheSpec,
    CapturedProgram,
    ProgramSpec,
    _drop_inference_no_ops,
    capture,
    tag_inputs,
)
from oiv2compile.models import load_model

aten = torch.ops.aten


def captured(
    preset: str, program: ProgramSpec = PREFILL, attn: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[CapturedProgram, CacheSpec]:
    hf = load_model(preset, dtype=dtype, device="cpu", seed=0).model
    hf.config._attn_implementation = attn
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=dtype)
    return capture(hf, spec, program), spec


def run(gm: torch.fx.GraphModule, spec: CacheSpec, program: ProgramSpec, seed: int = 0):
    """Run a program on fixed random inputs; returns (logits, caches after)."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = (2, 5) if program is PREFILL else (3, 1)
    caches = [torch.randn(spec.shape(), generator=gen).to(spec.torch_dtype) for _ in range(2 * spec.num_layers)]
    input_ids = torch.randint(0, 200, (batch, seq), generator=gen)
    positions = torch.tensor([0, 0] if program is PREFILL else [4, 9, 0])
    slots = torch.tensor([2, 0] if program is PREFILL else [1, 3, 0])
    last = torch.tensor([4, 2] if program is PREFILL else [0, 0, 0])
    logits = gm(input_ids, positions, slots, last, caches)
    return logits, caches


def built_programs(preset: str, cfg):  # type: ignore[no-untyped-def]
    """The prefill and decode programs of a tiny preset after the pipeline `cfg` asks for:
    (hf, spec, programs by name, pass records by name)."""
    from oiv2compile.passes.manager import run_passes
    from oiv2compile.passes.registry import pipeline

    hf = load_model(preset, dtype=torch.float32, device="cpu", seed=0).model
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=torch.float32)
    programs = {p.name: capture(hf, spec, p) for p in (PREFILL, DECODE)}
    records = {name: run_passes(c.graph_module, cfg, pipeline(cfg), label=name) for name, c in programs.items()}
    return hf, spec, programs, records


def ops(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def count(gm: torch.fx.GraphModule, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def snapshot(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return copy.deepcopy(gm)


def export_toy(module: torch.nn.Module, spec: CacheSpec, seq: int = 1) -> torch.fx.GraphModule:
    """Export a hand-written module with the executor's input contract and tag its inputs."""
    from oiv2compile._torch_compat import unlift

    inputs = (
        torch.zeros(2, seq, dtype=torch.long),
        torch.tensor([1, 2]),
        torch.tensor([0, 1]),
        torch.zeros(2, dtype=torch.long),
        [torch.zeros(spec.shape()) for _ in range(2 * spec.num_layers)],
    )
    with torch.no_grad():
        gm = unlift(torch.export.export(module, inputs, strict=False))
    _drop_inference_no_ops(gm)  # as capture does
    tag_inputs(gm, spec)
    return gm


def run_step(gm, spec: CacheSpec, prefill: bool = False):  # type: ignore[no-untyped-def]
    """(outputs, caches) of a captured program on fixed inputs: two prompts of 6 tokens (prefill), or one
    sequence's token at position 5 in slot 2, over seeded random caches."""
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(spec.shape(), generator=gen).to(spec.torch_dtype) for _ in range(2 * spec.num_layers)]
    if prefill:
        ids, positions, slots, last = (
            torch.tensor([[17, 3, 9, 4, 250, 1]] * 2),
            torch.tensor([0, 0]),
            torch.tensor([0, 2]),
            torch.tensor([5, 3]),
        )
    else:
        ids, positions, slots, last = torch.tensor([[17]]), torch.tensor([5]), torch.tensor([2]), torch.tensor([0])
    return gm(ids, positions, slots, last, caches), caches


__all__ = [
    "DECODE",
    "PREFILL",
    "aten",
    "built_programs",
    "captured",
    "count",
    "export_toy",
    "ops",
    "run",
    "run_step",
    "snapshot",
]
