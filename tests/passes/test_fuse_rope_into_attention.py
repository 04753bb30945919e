"""fuse_rope_into_attention: one oiv2::rope_kv_write_attention per attention layer of a decode program
in place of oiv2::rope_kv_write and oiv2::attention; never in prefill, nor where q has another reader."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.config import BuildConfig, Device
from oiv2compile.passes import pipeline
from oiv2compile.passes.fuse_qkv import fuse_qkv
from oiv2compile.passes.fuse_rope_into_attention import fuse_rope_into_attention
from oiv2compile.passes.fuse_rope_kv_write import fuse_rope_kv_write
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.rewrite_kv_cache import rewrite_kv_cache
from oiv2compile.passes.substitute_attention import substitute_attention
from tests.passes.helpers import DECODE, PREFILL, aten, count, run, snapshot

ROPE = torch.ops.oiv2.rope_kv_write.default
ATTENTION = torch.ops.oiv2.attention.default
FUSED = torch.ops.oiv2.rope_kv_write_attention.default


def _prepared(tiny_program, preset, program):
    """(graph before any pass, graph after the passes that fuse_rope_into_attention follows, spec)."""
    gm, spec = tiny_program(preset, program)
    before = snapshot(gm)
    for p in (rewrite_kv_cache, substitute_attention, fuse_qkv, fuse_rope_kv_write):
        p(gm, BuildConfig())
        cleanup(gm)
    return before, gm, spec


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
def test_fuses_every_decode_layer(preset, tiny_program):
    before, gm, spec = _prepared(tiny_program, preset, DECODE)
    layers = spec.num_layers
    assert count(gm, ROPE) == count(gm, ATTENTION) == layers and count(gm, FUSED) == 0

    assert fuse_rope_into_attention(gm, BuildConfig()) == layers
    cleanup(gm)

    assert count(gm, FUSED) == layers and count(gm, ROPE) == count(gm, ATTENTION) == 0
    for node in gm.graph.find_nodes(op="call_function", target=FUSED):
        assert node.meta["oiv2"] == {"num_heads": 4, "num_kv_heads": 2}
        assert node.args[3] is None  # the cache positions, as fuse_rope_kv_write left them
        assert tuple(node.meta["val"].shape[1:]) == (4, 1, 16)  # [B, Hq, 1, D]
    expected_logits, expected_caches = run(before, spec, DECODE)
    logits, caches = run(gm, spec, DECODE)
    torch.testing.assert_close(logits, expected_logits)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want)


def test_leaves_prefill_alone(tiny_program):
    _before, gm, spec = _prepared(tiny_program, "llama-tiny", PREFILL)
    assert fuse_rope_into_attention(gm, BuildConfig()) == 0
    assert count(gm, ROPE) == count(gm, ATTENTION) == spec.num_layers and count(gm, FUSED) == 0


def test_skips_a_layer_whose_rotated_q_is_read_elsewhere(tiny_program):
    _before, gm, spec = _prepared(tiny_program, "llama-tiny", DECODE)
    first = next(iter(gm.graph.find_nodes(op="call_function", target=ROPE)))
    with gm.graph.inserting_after(first):
        gm.graph.call_function(aten.sum.default, (first,))
    assert fuse_rope_into_attention(gm, BuildConfig()) == spec.num_layers - 1
    assert count(gm, ROPE) == count(gm, ATTENTION) == 1


def test_skips_a_layer_whose_attention_reads_other_caches(tiny_program):
    _before, gm, spec = _prepared(tiny_program, "llama-tiny", DECODE)
    attentions = list(gm.graph.find_nodes(op="call_function", target=ATTENTION))
    a, b = attentions[0], attentions[1]
    a.update_arg(1, b.args[1])  # layer 0's attention reads layer 1's key cache
    assert fuse_rope_into_attention(gm, BuildConfig()) == spec.num_layers - 1
    assert a in gm.graph.nodes


def test_the_pipeline_runs_it_by_default_on_cuda_inductor_builds_only():
    cuda = BuildConfig().replace(device="cuda")
    passes = pipeline(cuda)
    assert passes[passes.index(fuse_rope_kv_write) + 1] is fuse_rope_into_attention  # reads its op
    assert fuse_rope_into_attention not in pipeline(cuda.replace(device=Device.CPU))
    assert fuse_rope_into_attention not in pipeline(cuda.replace(backend="onnx"))
    assert fuse_rope_into_attention not in pipeline(cuda.replace(fusion={"enable_rope_into_attention": False}))
    assert fuse_rope_into_attention not in pipeline(cuda.replace(fusion={"enable_rope_kv_write": False}))
