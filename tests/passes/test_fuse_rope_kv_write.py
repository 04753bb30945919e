"""fuse_rope_kv_write: one oiv2::rope_kv_write per attention layer in place of the rotary embedding
of q and k and the two cache writes; never where the layer does not have that exact form."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.config import BuildConfig
from oiv2compile.passes.fuse_qkv import fuse_qkv
from oiv2compile.passes.fuse_rope_kv_write import fuse_rope_kv_write
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.rewrite_kv_cache import rewrite_kv_cache
from oiv2compile.passes.substitute_attention import substitute_attention
from tests.passes.helpers import DECODE, PREFILL, aten, count, run, snapshot

ROPE = torch.ops.oiv2.rope_kv_write.default
KV_WRITE = torch.ops.oiv2.kv_write.default


def _prepared(tiny_program, preset, program, fuse_projections=True):
    """(graph before any pass, graph after the passes that fuse_rope_kv_write follows, spec)."""
    gm, spec = tiny_program(preset, program)
    before = snapshot(gm)
    for p in (rewrite_kv_cache, substitute_attention) + ((fuse_qkv,) if fuse_projections else ()):
        p(gm, BuildConfig())
        cleanup(gm)
    return before, gm, spec


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_fuses_every_layer(preset, program, tiny_program):
    before, gm, spec = _prepared(tiny_program, preset, program)
    layers = spec.num_layers
    assert count(gm, KV_WRITE) == 2 * layers and count(gm, aten.neg.default) == 2 * layers and count(gm, ROPE) == 0

    assert fuse_rope_kv_write(gm, BuildConfig()) == layers
    cleanup(gm)

    assert count(gm, ROPE) == layers and count(gm, KV_WRITE) == 0
    # The rotations went, and with them HF's cos and sin: tables (cache length x D/2) stand in.
    assert count(gm, aten.neg.default) == 0 and count(gm, aten.sin.default) == count(gm, aten.cos.default) == 0
    buffers = dict(gm.named_buffers())
    assert buffers["hf.model.rotary_emb.cos_table"].shape == buffers["hf.model.rotary_emb.sin_table"].shape == (32, 8)
    for node in gm.graph.find_nodes(op="call_function", target=ROPE):
        assert node.meta["oiv2"] == {"num_heads": 4, "num_kv_heads": 2}
        assert node.args[3] is None  # the rotary positions are the cache positions: no [B, S] ids
    assert count(gm, aten.arange.default) == (1 if program is PREFILL else 0)  # prefill's row index stays
    expected_logits, expected_caches = run(before, spec, program)
    logits, caches = run(gm, spec, program)
    torch.testing.assert_close(logits, expected_logits)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want)


def test_needs_the_fused_projection(tiny_program):
    _before, gm, _spec = _prepared(tiny_program, "llama-tiny", DECODE, fuse_projections=False)
    assert fuse_rope_kv_write(gm, BuildConfig()) == 0
    assert count(gm, KV_WRITE) == 4


def test_skips_a_layer_whose_k_is_rotated_by_other_angles(tiny_program):
    _before, gm, spec = _prepared(tiny_program, "llama-tiny", DECODE)
    k_rot = next(n for n in gm.graph.find_nodes(op="call_function", target=KV_WRITE)).args[1]  # layer 0's k
    cos_mul = k_rot.args[0]
    with gm.graph.inserting_before(cos_mul):
        other = gm.graph.call_function(aten.mul.Tensor, (cos_mul.args[1], 2.0))
    other.meta["val"] = cos_mul.args[1].meta["val"]
    cos_mul.replace_input_with(cos_mul.args[1], other)

    assert fuse_rope_kv_write(gm, BuildConfig()) == spec.num_layers - 1
    cleanup(gm)
    assert count(gm, KV_WRITE) == 2


def test_skips_a_layer_whose_rotated_q_is_read_elsewhere(tiny_program):
    _before, gm, spec = _prepared(tiny_program, "llama-tiny", DECODE)
    attention = next(iter(gm.graph.find_nodes(op="call_function", target=torch.ops.oiv2.attention.default)))
    q_rot = attention.args[0]
    with gm.graph.inserting_after(attention):
        extra = gm.graph.call_function(aten.add.Tensor, (attention, q_rot))  # a second reader of q_rot
    attention.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    extra.meta["val"] = attention.meta["val"]

    assert fuse_rope_kv_write(gm, BuildConfig()) == spec.num_layers - 1


def test_keeps_position_ids_that_are_not_the_cache_positions(tiny_program):
    """Rotary positions shifted from the cache positions stay an input of the fused op."""
    _before, gm, spec = _prepared(tiny_program, "llama-tiny", DECODE)
    positions = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "positions")
    ids = next(iter(next(iter(positions.users)).users))  # positions[:, None] + arange(1)
    with gm.graph.inserting_after(ids):
        shifted = gm.graph.call_function(aten.add.Tensor, (ids, 1))
    shifted.meta["val"] = ids.meta["val"]
    ids.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
    gm.recompile()
    expected_logits, expected_caches = run(gm, spec, DECODE)

    assert fuse_rope_kv_write(gm, BuildConfig()) == spec.num_layers
    cleanup(gm)
    assert [n.args[3] for n in gm.graph.find_nodes(op="call_function", target=ROPE)] == [shifted] * spec.num_layers
    logits, caches = run(gm, spec, DECODE)
    torch.testing.assert_close(logits, expected_logits)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want)


def test_takes_the_cache_positions_whichever_order_the_sum_has(tiny_program):
    """arange(S)[None, :] + positions[:, None] is the cache positions too."""
    _before, gm, spec = _prepared(tiny_program, "llama-tiny", PREFILL)
    positions = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "positions")
    ids = next(iter(next(iter(positions.users)).users))  # positions[:, None] + arange(S)
    ids.args = tuple(reversed(ids.args))
    gm.recompile()
    expected_logits, _ = run(gm, spec, PREFILL)

    assert fuse_rope_kv_write(gm, BuildConfig()) == spec.num_layers
    cleanup(gm)
    assert [n.args[3] for n in gm.graph.find_nodes(op="call_function", target=ROPE)] == [None] * spec.num_layers
    torch.testing.assert_close(run(gm, spec, PREFILL)[0], expected_logits)
