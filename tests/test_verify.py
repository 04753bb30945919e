"""The build refuses programs that do not compute what Hugging Face computes."""

from __future__ import annotations

import json

import pytest
import torch

import oiv2compile
from oiv2compile import api, verify
from oiv2compile.capture import CacheSpec
from oiv2compile.config import BuildConfig
from oiv2compile.errors import BuildError, UnsupportedModelError
from oiv2compile.passes import PassRecord, pipeline
from oiv2compile.verify import check_pass_counts

SPEC = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, max_seq_len=64, max_batch_size=2, dtype="float32")


def test_a_pass_that_changes_the_numbers_fails_the_build(tmp_path, monkeypatch):
    def wrong_scale(gm: torch.fx.GraphModule, cfg: BuildConfig) -> int:
        n = 0
        for node in gm.graph.nodes:
            if node.target is torch.ops.oiv2.attention.default:
                node.args = (*node.args[:5], node.args[5] * 8.0)
                n += 1
        return n

    monkeypatch.setattr(api, "pipeline", lambda cfg: [*pipeline(cfg), wrong_scale])
    with pytest.raises(BuildError, match="differs from Hugging Face's own forward in the prefill logits"):
        oiv2compile.build("llama-tiny", tmp_path / "a", backend="eager", device="cpu", max_seq_len=64, max_batch_size=2)
    assert not (tmp_path / "a").exists()


def test_low_precision_measures_hf_noise_and_still_fails_a_wrong_graph(tmp_path, monkeypatch):
    """In bfloat16 the bound grows with HF's own noise (sdpa against eager attention), which must stay
    far below what a wrong graph gives."""
    kw = dict(backend="eager", device="cpu", dtype="bfloat16", max_seq_len=64, max_batch_size=2)
    oiv2compile.build("llama-tiny", tmp_path / "ok", **kw)
    report = json.loads((tmp_path / "ok" / "manifest.json").read_text())["verification"]
    assert 0 < report["hf_noise"] < 2e-2 and report["tolerance"] == max(5e-2, verify.NOISE_FACTOR * report["hf_noise"])
    assert max(report["relative_error"].values()) < report["tolerance"]

    def wrong_scale(gm: torch.fx.GraphModule, cfg: BuildConfig) -> int:
        for node in gm.graph.find_nodes(op="call_function", target=torch.ops.oiv2.attention.default):
            node.args = (*node.args[:5], node.args[5] * 8.0)
        return 1

    monkeypatch.setattr(api, "pipeline", lambda cfg: [*pipeline(cfg), wrong_scale])
    with pytest.raises(BuildError, match=r"relative error .* above the .* allowed in bfloat16 \(HF's own sdpa"):
        oiv2compile.build("llama-tiny", tmp_path / "bad", **kw)


def test_missing_rewrites_fail_with_the_architecture():
    check_pass_counts(
        [PassRecord("rewrite_kv_cache", 4, 1.0), PassRecord("substitute_attention", 2, 1.0)], SPEC, "X", "decode"
    )
    with pytest.raises(
        UnsupportedModelError, match=r"FooForCausalLM: substitute_attention rewrote 1 of the 2 attention"
    ):
        check_pass_counts([PassRecord("substitute_attention", 1, 1.0)], SPEC, "FooForCausalLM", "decode")
    with pytest.raises(UnsupportedModelError, match="rewrote 3 of the 4 cache writes in the prefill graph"):
        check_pass_counts([PassRecord("rewrite_kv_cache", 3, 1.0)], SPEC, "FooForCausalLM", "prefill")


def test_fusion_counts_are_checked_and_name_the_flag():
    layers = SPEC.num_layers
    fused = [PassRecord("fuse_qkv", layers, 1.0), PassRecord("fuse_ffn", layers, 1.0)]
    # 2 layers x 7 linears + head, less 2 per fused q/k/v and 1 per fused gate/up.
    check_pass_counts([*fused, PassRecord("quantize_weights", 9, 1.0)], SPEC, "X", "decode", linears_to_quantize=15)
    with pytest.raises(UnsupportedModelError, match="rewrote 15 of the 9 linear layers"):
        check_pass_counts([*fused, PassRecord("quantize_weights", 15, 1.0)], SPEC, "X", "decode", 15)
    with pytest.raises(UnsupportedModelError, match=r"fuse_norms rewrote 3 of the 4 .*build with --no-fuse-norms"):
        check_pass_counts([PassRecord("fuse_norms", 3, 1.0)], SPEC, "FooForCausalLM", "prefill")
