"""fuse_ffn: one fused gate-and-up linear and one oiv2::gated_act per gated MLP."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from oiv2compile.capture import CacheSpec, capture
from oiv2compile.config import BuildConfig
from oiv2compile.models import PRESETS
from oiv2compile.passes.fuse_ffn import fuse_ffn
from oiv2compile.passes.manager import cleanup
from tests.passes.helpers import DECODE, PREFILL, aten, count, export_toy, run, snapshot

GATED_ACT = torch.ops.oiv2.gated_act.default
ACTS = (aten.silu.default, aten.gelu.default)


def _fused_and_close(gm, spec, program, activation):
    before = snapshot(gm)
    layers = spec.num_layers
    linears = count(gm, aten.linear.default)
    assert count(gm, *ACTS) == layers and count(gm, GATED_ACT) == 0

    assert fuse_ffn(gm, BuildConfig()) == layers
    cleanup(gm)

    assert count(gm, GATED_ACT) == layers and count(gm, *ACTS) == 0
    assert count(gm, aten.linear.default) == linears - layers
    acts = {n.args[1] for n in gm.graph.nodes if n.target is GATED_ACT}
    assert acts == {activation}
    params, buffers = dict(gm.named_parameters()), dict(gm.named_buffers())
    assert not any(".gate_proj." in n or ".up_proj." in n for n in params)  # the originals are gone
    fused = buffers["hf.model.layers.0.mlp.gate_up_proj.weight"]
    assert fused.shape == (2 * 128, 64)  # [2I, H]
    expected_logits, expected_caches = run(before, spec, program)
    logits, caches = run(gm, spec, program)
    torch.testing.assert_close(logits, expected_logits)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_fuses_every_gated_mlp(preset, program, tiny_program):
    gm, spec = tiny_program(preset, program)
    _fused_and_close(gm, spec, program, "silu")


@pytest.mark.parametrize(("hidden_act", "activation"), [("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_gelu_models_get_their_activation(hidden_act, activation):
    fields = {k: v for k, v in PRESETS["llama-tiny"].items() if k != "model_type"}
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**fields, hidden_act=hidden_act)).eval()
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=torch.float32)
    _fused_and_close(capture(hf, spec, DECODE).graph_module, spec, DECODE, activation)


class _NotGated(torch.nn.Module):
    """MLPs that fuse_ffn must leave alone: act(up(x)) with no gate, a gate whose projection is also
    read elsewhere, and a gated product whose two projections read different inputs; then a gated
    MLP that it must fuse, so that the test shows the pattern fires on this kind of graph."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.plain = torch.nn.ModuleDict({"up": torch.nn.Linear(8, 12, bias=False)})
        self.leaky = torch.nn.ModuleDict({n: torch.nn.Linear(8, 12, bias=False) for n in ("gate", "up")})
        self.apart = torch.nn.ModuleDict({n: torch.nn.Linear(8, 12, bias=False) for n in ("gate", "up")})
        self.good = torch.nn.ModuleDict({n: torch.nn.Linear(8, 12, bias=True) for n in ("gate", "up")})

    def forward(self, input_ids, positions, slots, last_index, caches):
        x = self.embed(input_ids)  # [B, S, 8]
        plain = torch.nn.functional.silu(self.plain["up"](x))
        gate = self.leaky["gate"](x)
        leaky = torch.nn.functional.silu(gate) * self.leaky["up"](x) + gate
        apart = torch.nn.functional.silu(self.apart["gate"](x)) * self.apart["up"](x * 2)
        good = torch.nn.functional.silu(self.good["gate"](x)) * self.good["up"](x)
        return plain.sum() + leaky.sum() + apart.sum() + good.sum() + last_index.sum() + caches[0].sum()


def test_does_not_fire_on_other_mlps():
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, max_seq_len=8, max_batch_size=2, dtype="float32")
    gm = export_toy(_NotGated(), spec)
    assert count(gm, aten.silu.default) == 4
    assert fuse_ffn(gm, BuildConfig()) == 1  # only the last one (with biases)
    cleanup(gm)
    assert count(gm, aten.silu.default) == 3 and count(gm, GATED_ACT) == 1
    assert gm.get_buffer("good.gate_up_proj.bias").shape == (24,)
