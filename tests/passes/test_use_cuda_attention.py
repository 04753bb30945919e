"""use_cuda_attention: every oiv2::rope_kv_write_attention of a bf16 decode program whose q/k/v row comes
from a C++ kernel (a node recording its library; here the q/k/v product marked so) and whose shapes the
kernel takes becomes oiv2::prefetched_decode_attention with the same arguments, recording its library,
and the program computes the same (on the CPU both ops run one reference); rows from other kernels,
float32 programs and caches longer than the kernel's limit keep the Triton op; the pipeline runs it
right after use_cuda_kernels in CUDA Inductor builds with the quantized products on the C++ kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from oiv2compile.capture import DECODE, DECODE_B1, CacheSpec, capture
from oiv2compile.config import BuildConfig, Device
from oiv2compile.models import load_model
from oiv2compile.passes import use_cuda_kernels as kernels_pass
from oiv2compile.passes.fuse_qkv import fuse_qkv
from oiv2compile.passes.fuse_rope_into_attention import fuse_rope_into_attention
from oiv2compile.passes.fuse_rope_kv_write import fuse_rope_kv_write
from oiv2compile.passes.fx_utils import strip_views
from oiv2compile.passes.manager import cleanup, run_passes
from oiv2compile.passes.registry import pipeline
from oiv2compile.passes.rewrite_kv_cache import rewrite_kv_cache
from oiv2compile.passes.substitute_attention import substitute_attention
from oiv2compile.passes.use_cuda_attention import use_cuda_attention
from tests.passes.helpers import count, run, snapshot

TRITON = torch.ops.oiv2.rope_kv_write_attention.default
PREFETCHED = torch.ops.oiv2.prefetched_decode_attention.default
LIBRARY = Path("/x/oiv2_prefetched_decode_attention_0.so")
CUDA = BuildConfig(device=Device.CUDA)


@pytest.fixture
def library(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled libraries stand as paths: no nvcc here."""
    paths = {"oiv2compile.kernels.prefetched_decode_attention": LIBRARY}
    paths["oiv2compile.kernels.linear_int4_mma"] = Path("/x/oiv2_linear_int4_mma_0.so")
    monkeypatch.setattr(kernels_pass, "_LIBRARIES", paths)


def _model(dtype: torch.dtype) -> torch.nn.Module:
    """A two-layer Llama with heads of 64 features (2 query heads, 1 kv head)."""
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        vocab_size=259,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return load_model(LlamaForCausalLM(config).requires_grad_(False), dtype=dtype, device="cpu", seed=0).model


def _decode(dtype: torch.dtype, max_seq_len: int = 32, from_cuda_kernel: bool = True):
    """_model's decode program after the passes before use_cuda_attention (each q/k/v product marked as a
    C++ kernel's where from_cuda_kernel), and its CacheSpec."""
    hf = _model(dtype)
    spec = CacheSpec.for_model(hf.config, max_seq_len=max_seq_len, max_batch_size=3, dtype=dtype)
    gm = capture(hf, spec, DECODE).graph_module
    for p in (rewrite_kv_cache, substitute_attention, fuse_qkv, fuse_rope_kv_write, fuse_rope_into_attention):
        p(gm, CUDA)
        cleanup(gm)
    if from_cuda_kernel:
        for node in gm.graph.find_nodes(op="call_function", target=TRITON):
            strip_views(node.args[0]).meta.setdefault("oiv2", {})["library"] = "oiv2_linear_int4_mma_0.so"
    return gm, spec


def test_rewrites_every_bf16_decode_layer(library):
    gm, spec = _decode(torch.bfloat16)
    before = snapshot(gm)
    assert count(gm, TRITON) == spec.num_layers

    assert use_cuda_attention(gm, CUDA) == spec.num_layers
    cleanup(gm)

    assert count(gm, TRITON) == 0 and count(gm, PREFETCHED) == spec.num_layers
    olds = list(before.graph.find_nodes(op="call_function", target=TRITON))
    news = list(gm.graph.find_nodes(op="call_function", target=PREFETCHED))
    for old, new in zip(olds, news, strict=True):
        assert [str(a) for a in new.args] == [str(a) for a in old.args]
        assert new.meta["oiv2"]["library"] == LIBRARY.name
        assert new.meta["val"].shape == old.meta["val"].shape
    expected_logits, expected_caches = run(before, spec, DECODE)
    logits, caches = run(gm, spec, DECODE)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    for got, want in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert LIBRARY in kernels_pass.libraries(gm)


def test_the_int4_pipeline_ends_with_the_cpp_attention_after_the_norm_fused_product(library):
    """In the batch-1 decode program the fusions after use_cuda_attention put the norm into a q/k/v product
    it reads; the C++ attention then reads that (still C++) product's row."""
    cfg = CUDA.replace(quantization="int4", quant={"group_size": 32})
    hf = _model(torch.bfloat16)
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=torch.bfloat16)
    gm = capture(hf, spec, DECODE_B1).graph_module
    records = {r.name: r.count for r in run_passes(gm, cfg, pipeline(cfg), label="decode_b1")}
    assert records["use_cuda_attention"] == spec.num_layers and count(gm, TRITON) == 0
    producers = [strip_views(n.args[0]) for n in gm.graph.find_nodes(op="call_function", target=PREFETCHED)]
    # layer 0's first norm has no residual add before it and stays apart; layer 1's is in its q/k/v product
    mma = torch.ops.oiv2
    assert [p.target for p in producers] == [mma.linear_int4_mma.default, mma.rms_norm_linear_int4_mma.default]
    assert all("library" in p.meta["oiv2"] for p in producers)


def test_keeps_the_triton_op_after_other_kernels(library):
    gm, spec = _decode(torch.bfloat16, from_cuda_kernel=False)  # cuBLAS's q/k/v product
    assert use_cuda_attention(gm, CUDA) == 0 and count(gm, TRITON) == spec.num_layers


def test_keeps_the_triton_op_where_the_kernel_does_not_take_the_shapes(library):
    gm, spec = _decode(torch.float32)  # float32 activations
    assert use_cuda_attention(gm, CUDA) == 0 and count(gm, TRITON) == spec.num_layers
    gm, spec = _decode(torch.bfloat16, max_seq_len=384)  # a cache longer than 256 positions
    assert use_cuda_attention(gm, CUDA) == 0 and count(gm, TRITON) == spec.num_layers


def test_rewrites_nothing_where_the_kernel_does_not_compile(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(kernels_pass, "_LIBRARIES", {"oiv2compile.kernels.prefetched_decode_attention": None})
    gm, spec = _decode(torch.bfloat16)
    assert use_cuda_attention(gm, CUDA) == 0 and count(gm, TRITON) == spec.num_layers


def test_the_pipeline_runs_it_after_use_cuda_kernels_in_quantized_cuda_inductor_builds():
    for quant in ("int8", "int4"):
        cfg = CUDA.replace(quantization=quant)
        passes = pipeline(cfg)
        assert passes[passes.index(kernels_pass.use_cuda_kernels) + 1] is use_cuda_attention  # reads its nodes
        assert use_cuda_attention not in pipeline(cfg.replace(device="cpu"))
        assert use_cuda_attention not in pipeline(cfg.replace(backend="onnx"))
        assert use_cuda_attention not in pipeline(cfg.replace(attention={"enable_prefetched_decode": False}))
        assert use_cuda_attention not in pipeline(cfg.replace(fusion={"enable_rope_into_attention": False}))
        assert use_cuda_attention not in pipeline(cfg.replace(quant={"enable_cuda_kernels": False}))
    assert use_cuda_attention not in pipeline(CUDA)  # bf16: cuBLAS products
