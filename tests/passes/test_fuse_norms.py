"""fuse_norms: one oiv2::add_rms_norm per residual add followed by an RMSNorm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from oiv2compile.capture import CacheSpec
from oiv2compile.config import BuildConfig
from oiv2compile.passes.fuse_ffn import fuse_ffn
from oiv2compile.passes.fuse_norms import fuse_norms
from oiv2compile.passes.fuse_qkv import fuse_qkv
from oiv2compile.passes.manager import cleanup
from tests.passes.helpers import DECODE, PREFILL, aten, captured, count, export_toy, run, snapshot

ADD_RMS_NORM = torch.ops.oiv2.add_rms_norm.default


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_fuses_every_residual_norm(preset, program, tiny_program):
    gm, spec = tiny_program(preset, program)
    before = snapshot(gm)
    layers = spec.num_layers
    norms = 2 * layers + 1  # input and post-attention norm of each layer, and the final norm
    assert count(gm, aten.rsqrt.default) == norms

    # Every norm but the first layer's input norm, which reads the embeddings with no add before it.
    assert fuse_norms(gm, BuildConfig()) == 2 * layers
    cleanup(gm)

    assert count(gm, ADD_RMS_NORM) == 2 * layers and count(gm, aten.rsqrt.default) == 1
    expected_logits, expected_caches = run(before, spec, program)
    logits, caches = run(gm, spec, program)
    torch.testing.assert_close(logits, expected_logits)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want)


def test_bfloat16_model():
    """In a bf16 graph the residual is the add itself and the upcast a real copy; all three fusions
    still fire once per layer (twice for the norms) and compute what the unfused graph computes."""
    prog, spec = captured("qwen2-tiny", DECODE, dtype=torch.bfloat16)
    gm = prog.graph_module
    before = snapshot(gm)
    cfg = BuildConfig()
    assert (fuse_qkv(gm, cfg), fuse_ffn(gm, cfg), fuse_norms(gm, cfg)) == (2, 2, 4)
    cleanup(gm)
    expected_logits, _ = run(before, spec, DECODE)
    logits, _ = run(gm, spec, DECODE)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected_logits)


class _NotResidualNorm(torch.nn.Module):
    """Norms that fuse_norms must leave alone: an RMSNorm with no add before it, a LayerNorm after a
    residual add, and an RMSNorm after an add whose normalized value is also read before the weight;
    then one that it must fuse, so that the test shows the pattern fires on this kind of graph."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.rms = LlamaRMSNorm(8)
        self.layer_norm = torch.nn.LayerNorm(8)
        self.weight = torch.nn.Parameter(torch.ones(8))
        self.good = LlamaRMSNorm(8)

    def forward(self, input_ids, positions, slots, last_index, caches):
        x = self.embed(input_ids)  # [B, S, 8]
        plain = self.rms(x)
        layer = self.layer_norm(x + plain)
        h = (x + layer).to(torch.float32)
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        leaky = self.weight * normed.to(x.dtype) + normed
        good = self.good(x + leaky)
        return good.sum() + last_index.sum() + caches[0].sum()


def test_does_not_fire_without_a_residual_add():
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, max_seq_len=8, max_batch_size=2, dtype="float32")
    gm = export_toy(_NotResidualNorm(), spec)
    assert count(gm, aten.rsqrt.default) == 3
    assert fuse_norms(gm, BuildConfig()) == 1  # only the last one
    cleanup(gm)
    assert count(gm, aten.rsqrt.default) == 2 and count(gm, ADD_RMS_NORM) == 1
