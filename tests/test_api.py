"""End to end: build an artifact, load it, and compare its tokens with Hugging Face's own generation."""

from __future__ import annotations

import json

import pytest
import torch

import oiv2compile
from oiv2compile import _torch_compat
from oiv2compile.errors import BuildError, ConfigError, ModelNotFoundError, UnsupportedModelError
from oiv2compile.models import load_model
from tests.conftest import PROMPTS, TINY_BUILD, hf_greedy

NEW_TOKENS = 32
# Rewrites per program of a tiny (two-layer) preset built with the default passes.
PASS_COUNTS = {
    "rewrite_kv_cache": 4,
    "substitute_attention": 2,
    "fuse_qkv": 2,
    "fuse_rope_kv_write": 2,
    "fuse_ffn": 2,
    "fuse_norms": 4,
}


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
def test_inductor_artifact_greedy_equals_hf(preset, artifacts, hf_tiny):
    engine = oiv2compile.load(artifacts(preset))
    # Built with every pass, the fusions included: one per layer, two norms per layer.
    for program in ("prefill", "decode"):
        counts = {name: p["count"] for name, p in engine.manifest["passes"][program].items()}
        assert counts == PASS_COUNTS
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    expected = [hf_greedy(hf_tiny(preset), p, NEW_TOKENS) for p in PROMPTS]
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" and r.prompt_tokens == len(p) for r, p in zip(results, PROMPTS, strict=True))


def test_eager_backend_greedy_equals_hf(artifacts, hf_tiny):
    engine = oiv2compile.load(artifacts("llama-tiny", "eager"))
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert [r.token_ids for r in results] == [hf_greedy(hf_tiny("llama-tiny"), p, NEW_TOKENS) for p in PROMPTS]


def test_model_loaded_with_eager_attention_is_substituted(tmp_path):
    """HF's matmul-softmax-matmul attention becomes oiv2::attention just like sdpa does."""
    hf = load_model("mistral-tiny", dtype=torch.float32, device="cpu", seed=3).model
    hf.config._attn_implementation = "eager"
    out = oiv2compile.build(hf, tmp_path / "a", backend="eager", device="cpu", **TINY_BUILD)
    manifest = json.loads((out / "manifest.json").read_text())
    layers = hf.config.num_hidden_layers
    for program in ("prefill", "decode"):
        assert manifest["passes"][program]["substitute_attention"]["count"] == layers
        assert manifest["passes"][program]["rewrite_kv_cache"]["count"] == 2 * layers
    engine = oiv2compile.load(out)
    got = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert [r.token_ids for r in got] == [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]


def test_manifest_records_build(artifacts):
    manifest = json.loads((artifacts("llama-tiny") / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["torch_version"] == torch.__version__
    assert manifest["device"]["type"] == "cpu" and manifest["device"]["cpu_isa"] in _torch_compat.host_cpu_isas()
    assert manifest["build_config"]["dtype"] == "float32"
    assert manifest["build_config"]["device"] == "cpu"
    assert set(manifest["programs"]) == {"prefill", "decode"}
    assert manifest["passes"]["decode"] == {
        name: {"count": n, "ms": manifest["passes"]["decode"][name]["ms"]} for name, n in PASS_COUNTS.items()
    }
    assert manifest["verification"]["relative_error"]["prefill"] < 1e-4
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"
    on_disk = {p.name for p in artifacts("llama-tiny").rglob("*") if p.is_file()} - {"manifest.json"}
    assert {name.rsplit("/", 1)[-1] for name in manifest["files"]} == on_disk


def test_weights_are_stored_once_and_shared(artifacts):
    """One safetensors copy of the weights; the .pt2 packages hold code, not weights."""
    from safetensors.torch import load_file

    root = artifacts("qwen2-tiny")  # tied embeddings: stored once, the head is an alias
    manifest = json.loads((root / "manifest.json").read_text())
    weights = manifest["weights"]
    assert len(weights["aliases"]) == 1
    ((alias, name),) = weights["aliases"].items()
    assert {alias, name} == {"hf.lm_head.weight", "hf.model.embed_tokens.weight"}
    stored = {}
    for file in weights["files"]:
        stored.update(load_file(str(root / file)))
    assert alias not in stored and name in stored
    probe = stored["hf.model.layers.0.mlp.down_proj.weight"].numpy().tobytes()[:512]
    for entry in manifest["programs"].values():
        assert probe not in (root / entry["file"]).read_bytes()


def test_build_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    with pytest.raises(BuildError, match="already exists"):
        oiv2compile.build("llama-tiny", out, device="cpu", **TINY_BUILD)
    missing = tmp_path / "b"
    with pytest.raises(ModelNotFoundError):
        oiv2compile.build(tmp_path / "no-such-model", missing, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_bad_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="max_batch_size"):
        oiv2compile.build("llama-tiny", tmp_path / "a", max_batch_size=0)
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings"):
        oiv2compile.build("llama-tiny", tmp_path / "a", device="cpu", max_seq_len=4096)
    assert not (tmp_path / "a").exists()


def test_sliding_window_beyond_max_seq_len_is_refused(tmp_path):
    hf = load_model("mistral-tiny", dtype=torch.float32, device="cpu", seed=0).model
    hf.config.sliding_window = 64
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        oiv2compile.build(hf, tmp_path / "a", device="cpu", **TINY_BUILD)
    # Within the window the sliding mask is the plain causal mask: allowed.
    oiv2compile.build(hf, tmp_path / "b", backend="eager", device="cpu", max_seq_len=64, max_batch_size=2)


@pytest.mark.parametrize(
    ("model_type", "fields", "message"),
    [
        ("mamba", dict(hidden_size=64, num_hidden_layers=2, vocab_size=300, state_size=4), "linear_attention"),
        (
            "gemma2",
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=300,
            ),
            "soft-caps",
        ),
    ],
)
def test_unsupported_architecture_is_refused_by_name(tmp_path, model_type, fields, message):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    with pytest.raises(UnsupportedModelError, match=message) as info:
        oiv2compile.build(hf, tmp_path / "a", backend="eager", device="cpu", max_seq_len=64, max_batch_size=2)
    assert type(hf).__name__ in str(info.value)
    assert "llama, mistral, qwen2" in str(info.value)
    assert not (tmp_path / "a").exists()


def test_programs_share_the_weights_the_passes_make():
    """The decode program's fused weights are the prefill program's tensors, not a second copy."""
    from oiv2compile.api import _share_pass_weights

    def program(seed: int) -> torch.fx.GraphModule:
        gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
        gm.add_module("mlp", torch.nn.Module())
        gm.mlp.register_buffer("gate_up", torch.full((4, 2), float(seed)))
        gm.mlp.register_buffer("scratch", torch.zeros(3), persistent=False)
        gm.mlp.register_buffer("other_shape", torch.zeros(seed + 1))
        return gm

    first, second = program(0), program(1)
    _share_pass_weights(first, second)
    assert second.mlp.gate_up is first.mlp.gate_up and second.mlp.scratch is first.mlp.scratch
    assert "scratch" in second.mlp._non_persistent_buffers_set
    assert second.mlp.other_shape is not first.mlp.other_shape


def test_build_frees_the_weights_its_passes_made_and_leaves_the_callers_model(tmp_path, monkeypatch):
    """torch.export and Inductor may keep a build's graphs alive; the fused weights the passes made
    are emptied when the build ends, while a model object passed in keeps every weight."""
    from oiv2compile import api

    made: list[torch.Tensor] = []

    def recording(gm, hf):
        tensors = _made_by_passes(gm, hf)
        made.extend(tensors)
        return tensors

    _made_by_passes = api._made_by_passes
    monkeypatch.setattr(api, "_made_by_passes", recording)
    hf = load_model("llama-tiny", dtype=torch.float32, device="cpu", seed=3).model
    before = {name: p.detach().clone() for name, p in hf.named_parameters()}
    out = oiv2compile.build(hf, tmp_path / "a", backend="eager", device="cpu", **TINY_BUILD)
    layers = hf.config.num_hidden_layers
    # A fused qkv and gate/up weight per layer at least; shared between the two programs.
    assert len({id(t) for t in made}) >= 2 * layers
    assert all(t.numel() == 0 for t in made)
    assert all(torch.equal(p, before[name]) for name, p in hf.named_parameters())
    got = oiv2compile.load(out).generate(PROMPTS, max_new_tokens=8, stop_token_ids=[])
    assert [r.token_ids for r in got] == [hf_greedy(hf, p, 8) for p in PROMPTS]
