"""The pass manager: order, report, dumps, cleanup, and errors that name the pass."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.config import BuildConfig
from oiv2compile.passes import PassError, pipeline, run_passes
from oiv2compile.passes.fuse_ffn import fuse_ffn
from oiv2compile.passes.fuse_norms import fuse_norms
from oiv2compile.passes.fuse_qkv import fuse_qkv
from oiv2compile.passes.fuse_rope_kv_write import fuse_rope_kv_write
from oiv2compile.passes.quantize_embedding import quantize_embedding
from oiv2compile.passes.quantize_weights import quantize_weights
from oiv2compile.passes.rewrite_kv_cache import rewrite_kv_cache
from oiv2compile.passes.substitute_attention import substitute_attention
from tests.passes.helpers import PREFILL, aten, captured


def test_pipeline_follows_the_config():
    assert pipeline(BuildConfig()) == [
        rewrite_kv_cache,
        substitute_attention,
        fuse_qkv,
        fuse_rope_kv_write,
        fuse_ffn,
        fuse_norms,
    ]
    # The fusions come before quantization, which quantizes the fused weights; the table after the
    # head, whose quantized tensors a tied table reads.
    int8 = BuildConfig().replace(quantization="int8", fusion={"enable_norms": False})
    assert pipeline(int8) == [
        rewrite_kv_cache,
        substitute_attention,
        fuse_qkv,
        fuse_rope_kv_write,
        fuse_ffn,
        quantize_weights,
        quantize_embedding,
    ]
    # The rotary fusion reads the fused projection: without fuse_qkv it does not run.
    assert fuse_rope_kv_write not in pipeline(BuildConfig().replace(fusion={"enable_qkv": False}))
    no_table = int8.replace(quant={"include_embedding": False})
    assert pipeline(no_table)[-1] is quantize_weights
    unfused = {"enable_qkv": False, "enable_ffn": False, "enable_norms": False}
    only_cache = BuildConfig().replace(attention={"enable_substitution": False}, fusion=unfused)
    assert pipeline(only_cache) == [rewrite_kv_cache]
    none = only_cache.replace(kv_cache={"enable_rewrite": False})
    assert pipeline(none) == []


def test_report_dump_and_cleanup(tmp_path, monkeypatch):
    monkeypatch.setenv("OIV2_DUMP_DIR", str(tmp_path))
    prog, _spec = captured("llama-tiny", PREFILL)
    cfg = BuildConfig().replace(fusion={"enable_qkv": False, "enable_ffn": False, "enable_norms": False})
    records = run_passes(prog.graph_module, cfg, pipeline(cfg), label="prefill")
    assert [(r.name, r.count) for r in records] == [("rewrite_kv_cache", 4), ("substitute_attention", 2)]
    assert all(r.ms >= 0 for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "prefill.00.rewrite_kv_cache.after.txt",
        "prefill.00.rewrite_kv_cache.before.txt",
        "prefill.01.substitute_attention.after.txt",
        "prefill.01.substitute_attention.before.txt",
    ]
    assert "index_put_" in (tmp_path / "prefill.00.rewrite_kv_cache.before.txt").read_text()
    assert "oiv2.kv_write" in (tmp_path / "prefill.00.rewrite_kv_cache.after.txt").read_text()
    # Dead code goes after each pass: the whole-row cache reads fed only the replaced attention.
    cache_reads = [
        n for n in prog.graph_module.graph.nodes if n.target is aten.index.Tensor and n.args[0].op == "placeholder"
    ]
    assert cache_reads == []


def test_failure_names_the_pass():
    prog, _ = captured("llama-tiny", PREFILL)

    def explode(gm: torch.fx.GraphModule, cfg: BuildConfig) -> int:
        raise KeyError("boom")

    with pytest.raises(PassError, match="pass explode failed on the prefill graph"):
        run_passes(prog.graph_module, BuildConfig(), [explode], label="prefill")
