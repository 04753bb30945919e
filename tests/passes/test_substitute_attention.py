"""substitute_attention: one oiv2::attention per layer, from the sdpa and the eager form."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.capture import CacheSpec
from oiv2compile.config import BuildConfig
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.rewrite_kv_cache import rewrite_kv_cache
from oiv2compile.passes.substitute_attention import substitute_attention
from tests.passes.helpers import DECODE, PREFILL, aten, captured, count, export_toy, ops, run, snapshot

ATTENTION = torch.ops.oiv2.attention.default


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_substitutes_every_attention(preset, attn, program):
    prog, spec = captured(preset, program, attn)
    gm = prog.graph_module
    before = snapshot(gm)
    layers = spec.num_layers
    cfg = BuildConfig()
    assert rewrite_kv_cache(gm, cfg) == 2 * layers
    cleanup(gm)
    if attn == "sdpa":
        assert count(gm, aten.scaled_dot_product_attention.default) == layers
    else:
        assert count(gm, aten.softmax.int, aten._softmax.default) == layers

    assert substitute_attention(gm, cfg) == layers
    cleanup(gm)

    assert count(gm, ATTENTION) == layers
    assert count(gm, aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default) == 0
    # The whole-row gathers of the cache for HF's attention are gone with it.
    assert not any(
        n.target is aten.index.Tensor and n.args[0].op == "placeholder"
        for n in gm.graph.nodes
        if n.op == "call_function"
    )
    assert "oiv2.kv_write.default" in ops(gm)
    expected_logits, expected_caches = run(before, spec, program)
    logits, caches = run(gm, spec, program)
    torch.testing.assert_close(logits, expected_logits)
    # Default float32 tolerances, not exact: attention sums in another order, so from the second
    # layer on the cached keys and values differ in the last bits.
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want)


class _NotCacheAttention(torch.nn.Module):
    """Attention whose keys are fresh projections, and one whose mask reads a cache: neither is the
    executor's cached causal attention."""

    def forward(self, input_ids, positions, slots, last_index, caches):
        k_cache, v_cache = caches
        x = input_ids.float()[:, None, :, None].expand(2, 2, 1, 4)  # [B, H, S, D]
        mask = torch.arange(8)[None, None, None, :] <= positions[:, None, None, None]
        rows_k, rows_v = k_cache[slots], v_cache[slots]
        fresh = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        odd_mask = rows_k[:, :1, None, :, 0] > 0  # [B, 1, 1, T] computed from the cache
        odd = torch.nn.functional.scaled_dot_product_attention(x, rows_k, rows_v, attn_mask=odd_mask)
        causal = torch.nn.functional.scaled_dot_product_attention(x, rows_k, rows_v, attn_mask=mask)
        return fresh.sum() + odd.sum() + causal.sum() + last_index.sum()


def test_does_not_fire_on_other_attention():
    spec = CacheSpec(num_layers=1, num_kv_heads=2, head_dim=4, max_seq_len=8, max_batch_size=2, dtype="float32")
    gm = export_toy(_NotCacheAttention(), spec)
    assert count(gm, aten.scaled_dot_product_attention.default) == 3
    # Only the third is the executor's pattern.
    assert substitute_attention(gm, BuildConfig()) == 1
    assert count(gm, aten.scaled_dot_product_attention.default) == 2
