"""fuse_qkv: one fused q/k/v linear and a split per attention layer, with and without biases."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.capture import CacheSpec
from oiv2compile.config import BuildConfig
from oiv2compile.passes.fuse_qkv import fuse_qkv
from oiv2compile.passes.manager import cleanup
from tests.passes.helpers import DECODE, PREFILL, aten, count, export_toy, run, snapshot

SPLIT = aten.split_with_sizes.default


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_fuses_every_qkv(preset, program, tiny_program):
    gm, spec = tiny_program(preset, program)
    before = snapshot(gm)
    layers = spec.num_layers
    linears = count(gm, aten.linear.default)
    assert count(gm, SPLIT) == 0

    assert fuse_qkv(gm, BuildConfig()) == layers
    cleanup(gm)

    assert count(gm, SPLIT) == layers and count(gm, aten.linear.default) == linears - 2 * layers
    params, buffers = dict(gm.named_parameters()), dict(gm.named_buffers())
    assert not any(f".{p}_proj." in n for n in params for p in "qkv")  # the originals are gone
    # [(Hq + 2 Hkv) * D, H] = [(4 + 2 * 2) * 16, 64]
    assert buffers["hf.model.layers.1.self_attn.qkv_proj.weight"].shape == (128, 64)
    biased = preset == "qwen2-tiny"
    assert ("hf.model.layers.1.self_attn.qkv_proj.bias" in buffers) == biased
    assert count(gm, aten.linear.default) == linears - 2 * layers
    expected_logits, expected_caches = run(before, spec, program)
    logits, caches = run(gm, spec, program)
    torch.testing.assert_close(logits, expected_logits)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want)


class _NotQkv(torch.nn.Module):
    """Linears that fuse_qkv must leave alone: two on one input, three on three inputs, and three on
    one input of which only two have a bias; then three that it must fuse, so that the test shows the
    pattern fires on this kind of graph."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.pair = torch.nn.ModuleDict({n: torch.nn.Linear(8, 4, bias=False) for n in "ab"})
        self.apart = torch.nn.ModuleDict({n: torch.nn.Linear(8, 4, bias=False) for n in "qkv"})
        self.mixed = torch.nn.ModuleDict({n: torch.nn.Linear(8, 4, bias=n != "v") for n in "qkv"})
        self.good = torch.nn.ModuleDict({n: torch.nn.Linear(8, 4, bias=False) for n in "qkv"})

    def forward(self, input_ids, positions, slots, last_index, caches):
        x = self.embed(input_ids)  # [B, S, 8]
        pair = self.pair["a"](x) * self.pair["b"](x)
        apart = self.apart["q"](x) + self.apart["k"](x + 1) + self.apart["v"](x * 2)
        mixed = self.mixed["q"](x) + self.mixed["k"](x) + self.mixed["v"](x)
        good = self.good["q"](x) * self.good["k"](x) - self.good["v"](x)
        return pair.sum() + apart.sum() + mixed.sum() + good.sum() + last_index.sum() + caches[0].sum()


def test_does_not_fire_on_other_linears():
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, max_seq_len=8, max_batch_size=2, dtype="float32")
    gm = export_toy(_NotQkv(), spec)
    assert count(gm, aten.linear.default) == 11
    assert fuse_qkv(gm, BuildConfig()) == 1  # only the last three
    cleanup(gm)
    assert count(gm, aten.linear.default) == 9 and count(gm, SPLIT) == 1
