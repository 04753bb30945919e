"""The onnx backend: greedy parity with Hugging Face, the contrib ops in the exported graphs, errors."""

from __future__ import annotations

import json

import pytest
import torch

import oiv2compile
from oiv2compile.backends import onnx as onnx_backend
from oiv2compile.cli import main
from oiv2compile.errors import ConfigError
from tests.conftest import PROMPTS, TINY_BUILD, hf_greedy

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

NEW_TOKENS = 32
PRESETS = ["llama-tiny", "mistral-tiny", "qwen2-tiny"]
# int4 groups of 32: the tiny presets' 64 input features are not a multiple of the default 128.
QUANT = {"int8": {"quantization": "int8"}, "int4": {"quantization": "int4", "quant": {"group_size": 32}}}
# These tests compare with Hugging Face themselves, and the onnx build checks its model against the
# transformed graph: the build's own comparison with Hugging Face is left out to save test time.
FAST = {"enable_verification": False}


def _ops(path, program: str) -> dict[tuple[str, str], int]:
    model = onnx.load(str(path / f"{program}.onnx"), load_external_data=False)
    counts: dict[tuple[str, str], int] = {}
    for node in model.graph.node:
        counts[node.domain, node.op_type] = counts.get((node.domain, node.op_type), 0) + 1
    return counts


@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_artifact_greedy_equals_hf(preset, artifacts, hf_tiny):
    engine = oiv2compile.load(artifacts(preset, "onnx", **FAST))
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == [hf_greedy(hf_tiny(preset), p, NEW_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_graphs_hold_one_attention_and_two_skip_norms_per_layer(preset, artifacts):
    path = artifacts(preset, "onnx", **FAST)
    manifest = json.loads((path / "manifest.json").read_text())
    layers = manifest["cache"]["num_layers"]
    for program in ("prefill", "decode"):
        ops = _ops(path, program)
        assert ops.get(("com.microsoft", "GroupQueryAttention")) == layers
        # Two RMSNorms per layer and the final one: each after a residual Add becomes one
        # SkipSimplifiedLayerNormalization; the first, after the embedding, a SimplifiedLayerNormalization
        # (ONNX Runtime's own op, in the onnx domain).
        assert ops.get(("com.microsoft", "SkipSimplifiedLayerNormalization")) == 2 * layers
        assert ops.get(("", "SimplifiedLayerNormalization")) == 1
        assert ("", "Pow") not in ops and ("", "Softmax") not in ops  # nothing left unfused
        recorded = manifest["programs"][program]["contrib_ops"]
        assert recorded == {op: n for (domain, op), n in ops.items() if domain == "com.microsoft"}
        assert manifest["programs"][program]["rsqrt_as_division"] == 2 * layers + 1
        assert manifest["programs"][program]["skip_norm_fusions"] == 2 * layers


def test_decode_attention_in_standard_ops_equals_hf(monkeypatch, tmp_path, hf_tiny):
    """The translation a CUDA build's decode program takes (ScatterND into the bound caches, then
    MatMul/Softmax), built and checked here on the CPU provider: greedy parity with HF and its ops."""
    monkeypatch.setattr(onnx_backend, "uses_standard_attention", lambda program, cfg: program.program.name == "decode")
    path = tmp_path / "llama-tiny-onnx"
    oiv2compile.build("llama-tiny", path, backend="onnx", device="cpu", dtype="float32", **TINY_BUILD, **FAST)
    manifest = json.loads((path / "manifest.json").read_text())
    layers = manifest["cache"]["num_layers"]
    decode, prefill = _ops(path, "decode"), _ops(path, "prefill")
    assert ("com.microsoft", "GroupQueryAttention") not in decode
    assert decode[("", "ScatterND")] == 2 * layers and decode[("", "Softmax")] == layers
    assert prefill[("com.microsoft", "GroupQueryAttention")] == layers and ("", "ScatterND") not in prefill
    assert manifest["programs"]["decode"]["attention_op"] == "standard ops"
    assert manifest["programs"]["prefill"]["attention_op"] == "GroupQueryAttention"
    engine = oiv2compile.load(path)
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == [hf_greedy(hf_tiny("llama-tiny"), p, NEW_TOKENS) for p in PROMPTS]


def test_onnx_stream_matches_generate(artifacts):
    engine = oiv2compile.load(artifacts("llama-tiny", "onnx", **FAST))
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    for token in engine.stream(PROMPTS, max_new_tokens=8):
        streamed[token.index].append(token.token_id)
    assert streamed == [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=8)]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_onnx_artifacts_run_every_linear_as_matmul_nbits(quant, artifacts):
    """Every linear becomes MatMulNBits: int4 by translation (repacked), int8 by ONNX Runtime's
    DequantizeLinear + MatMul fusion. The build's own check compared the logits with the transformed
    graph, whose quantized linears are the oiv2 ops' references; here the greedy tokens too."""
    path = artifacts("llama-tiny", "onnx", **QUANT[quant], **FAST)
    engine = oiv2compile.load(path)
    for program in ("prefill", "decode"):
        assert engine.manifest["programs"][program]["check_max_abs_diff"] < 1e-4
    linears = engine.manifest["quantization"]["linears"]
    # q, k and v are one linear (fuse_qkv); gate and up stay apart (fuse_ffn is off for onnx).
    assert engine.manifest["build_config"]["fusion"] == {
        "enable_qkv": True,
        "enable_ffn": False,
        "enable_norms": False,
        "enable_rope_kv_write": False,
        "enable_rope_into_attention": False,
        "enable_norm_into_linear": False,
        "enable_gated_act_into_linear": False,
    }
    assert linears == 5 * engine.spec.num_layers + 1
    for program in ("prefill", "decode"):
        ops = _ops(path, program)
        assert ops.get(("com.microsoft", "MatMulNBits")) == linears
        assert ("", "DequantizeLinear") not in ops


def test_onnx_program_refuses_other_cache_rows(artifacts):
    engine = oiv2compile.load(artifacts("llama-tiny", "onnx", **FAST))
    ids = torch.tensor([[5, 17]])
    with pytest.raises(AssertionError, match="cache rows"):
        one = torch.ones(1, dtype=torch.long)
        engine._prefill(ids, one - 1, one, one, engine.caches)


def test_missing_extra_fails_at_once_with_one_sentence(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(onnx_backend, "_find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'oiv2compile\[onnx\]'"):
        oiv2compile.build("llama-tiny", tmp_path / "api", backend="onnx", device="cpu")
    code = main(["build", "llama-tiny", "-o", str(tmp_path / "cli"), "--backend", "onnx", "--device", "cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("oiv2compile: error:")]
    assert code == 2 and len(errors) == 1 and "oiv2compile[onnx]" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()


def test_bfloat16_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="float32 or float16"):
        oiv2compile.build("llama-tiny", tmp_path / "bf16", backend="onnx", device="cpu", dtype="bfloat16")


def test_bench_measures_an_onnx_artifact(artifacts, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", str(artifacts("llama-tiny", "onnx", **FAST)), "--batch-sizes", "1,2", "--baselines", ""]
    runs = ["--prompt-len", "8", "--new-tokens", "8", "--repeats", "1", "--warmup", "1", "--out", str(out)]
    assert main([*argv, *runs]) == 0, capsys.readouterr().err
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["backend"], r["batch"], r["status"]) for r in rows] == [("onnx", 1, "ok"), ("onnx", 2, "ok")]
    assert all(r["decode_tok_s"]["median"] > 0 for r in rows)
