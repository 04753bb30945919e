"""use_cuda_kernels: int4 products whose weights fit the tensor-core layout become oiv2::linear_int4_mma
(any row count), one-row int8 products the C++ GEMV, prefill-sized int8 products the C++ GEMM, nothing
else changes, and the program computes the same; here on the CPU, where the C++ ops run their reference
and the libraries the pass would compile stand as paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oiv2compile.capture import DECODE, DECODE_B1, PREFILL, CacheSpec, capture
from oiv2compile.config import Backend, BuildConfig, Device
from oiv2compile.kernels import _cuda_extension
from oiv2compile.models import load_model
from oiv2compile.passes import use_cuda_kernels as gemv_pass
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.quantize_embedding import quantize_embedding
from oiv2compile.passes.quantize_weights import quantize_weights
from oiv2compile.passes.registry import pipeline
from tests.passes.helpers import aten, count, run_step, snapshot

INT8, INT4 = torch.ops.oiv2.linear_int8.default, torch.ops.oiv2.linear_int4.default
GEMV8, MMA4 = torch.ops.oiv2.linear_int8_gemv.default, torch.ops.oiv2.linear_int4_mma.default
GEMM8 = torch.ops.oiv2.linear_int8_gemm.default
LINEARS = 15  # llama-tiny unfused: 2 layers x 7 + the head
# The head's 259 rows are not a multiple of 16: it keeps the grouphalves layout and the Triton op.
MMA_LINEARS = LINEARS - 1


@pytest.fixture
def libraries(monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The compiled libraries stand as paths: no nvcc here."""
    paths = {"oiv2compile.kernels.linear_int8_gemv": Path("/x/oiv2_linear_int8_gemv_0.so")}
    paths["oiv2compile.kernels.linear_int4_mma"] = Path("/x/oiv2_linear_int4_mma_0.so")
    paths["oiv2compile.kernels.linear_int8_gemm"] = Path("/x/oiv2_linear_int8_gemm_0.so")
    monkeypatch.setattr(gemv_pass, "_LIBRARIES", dict(paths))
    return paths


def _quantized(program, quant: str, dtype: torch.dtype = torch.bfloat16):  # type: ignore[no-untyped-def]
    """The kernels take bf16 or fp16 activations: the model in bf16 (its reference runs on the CPU)."""
    hf = load_model("llama-tiny", dtype=dtype, device="cpu", seed=0).model
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=dtype)
    gm = capture(hf, spec, program).graph_module
    cfg = _cuda_cfg(quant)
    for p in (quantize_weights, quantize_embedding):
        p(gm, cfg)
        cleanup(gm)
    return gm, spec, cfg


def _cuda_cfg(quant: str) -> BuildConfig:
    return BuildConfig(device=Device.CUDA, backend=Backend.INDUCTOR).replace(
        quantization=quant,
        quant={"group_size": 32},
        fusion={"enable_qkv": False, "enable_ffn": False, "enable_norms": False},
    )


def test_every_one_row_int8_product_of_the_batch_1_decode_program_is_rewritten(libraries):
    gm, spec, cfg = _quantized(DECODE_B1, "int8")
    before = snapshot(gm)
    assert count(gm, INT8) == LINEARS and count(gm, GEMV8) == 0

    assert gemv_pass.use_cuda_kernels(gm, cfg) == LINEARS
    cleanup(gm)

    assert count(gm, INT8) == 0 and count(gm, GEMV8) == LINEARS
    for node in gm.graph.find_nodes(op="call_function", target=GEMV8):
        assert node.args[0].target is aten.reshape.default and node.args[0].meta["val"].shape[0] == 1
        assert node.meta["oiv2"]["library"] == libraries["oiv2compile.kernels.linear_int8_gemv"].name
        assert "quantized" in node.meta["oiv2"]  # verify.py still finds the quantized weight
    assert gemv_pass.libraries(gm) == [libraries["oiv2compile.kernels.linear_int8_gemv"]]
    _assert_same_results(before, gm, spec)


@pytest.mark.parametrize("program", [DECODE_B1, PREFILL], ids=["decode_b1", "prefill"])
def test_int4_products_that_fit_the_tensor_core_layout_are_rewritten_at_any_row_count(program, libraries):
    gm, spec, cfg = _quantized(program, "int4")
    before = snapshot(gm)
    grouphalves = {str(n.target) for n in gm.graph.find_nodes(op="get_attr") if str(n.target).endswith("_int4")}

    assert gemv_pass.use_cuda_kernels(gm, cfg) == MMA_LINEARS
    cleanup(gm)

    assert count(gm, MMA4) == MMA_LINEARS and count(gm, INT4) == 1  # the head
    for node in gm.graph.find_nodes(op="call_function", target=MMA4):
        packed, pairs = (_attr(gm, a) for a in node.args[1:])
        assert packed.dtype == torch.uint8 and pairs.dim() == 4 and pairs.shape[2:] == (16, 2)
        facts = node.meta["oiv2"]
        assert facts["layout"] == "int4-mma16x64-v1" and "quantized" in facts
        assert facts["library"] == libraries["oiv2compile.kernels.linear_int4_mma"].name
    # The repacked tensors replace the grouphalves ones; the head's stay.
    left = {str(n.target) for n in gm.graph.find_nodes(op="get_attr") if str(n.target).endswith("_int4")}
    kept = {t for t in grouphalves if "lm_head" in t or "embed_tokens" in t}  # the head's, the lookup's
    assert len(grouphalves) == LINEARS + 1 and left == kept
    assert {name for name, _ in gm.named_buffers() if name.endswith("_int4")} == kept
    _assert_same_results(before, gm, spec, prefill=program is PREFILL)


def _attr(gm, node):  # type: ignore[no-untyped-def]
    owner, _, leaf = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)


def _assert_same_results(before, gm, spec, prefill=False):  # type: ignore[no-untyped-def]
    (want, want_caches), (got, got_caches) = run_step(before, spec, prefill), run_step(gm, spec, prefill)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_caches, want_caches, strict=True):
        torch.testing.assert_close(a, b)


def test_int8_products_of_a_prefill_go_to_the_gemm(libraries):
    """Prefill's rows are the prompt's (symbolic), which the Triton op does not take: the C++ GEMM, on the
    same weight tensors; the head's too (one row a sequence, the batch symbolic)."""
    gm, spec, cfg = _quantized(PREFILL, "int8")
    before = snapshot(gm)
    weights = {(n.args[1], n.args[2]) for n in gm.graph.find_nodes(op="call_function", target=INT8)}

    assert gemv_pass.use_cuda_kernels(gm, cfg) == LINEARS
    cleanup(gm)

    assert count(gm, GEMM8) == LINEARS and count(gm, INT8) == 0 and count(gm, GEMV8) == 0
    assert {(n.args[1], n.args[2]) for n in gm.graph.find_nodes(op="call_function", target=GEMM8)} == weights
    for node in gm.graph.find_nodes(op="call_function", target=GEMM8):
        assert node.meta["oiv2"]["library"] == libraries["oiv2compile.kernels.linear_int8_gemm"].name
        assert "quantized" in node.meta["oiv2"]
    assert gemv_pass.libraries(gm) == [libraries["oiv2compile.kernels.linear_int8_gemm"]]
    _assert_same_results(before, gm, spec, prefill=True)


def test_int8_products_of_a_decode_batch_keep_the_triton_op(libraries):
    """One token a sequence, the batch dynamic: the Triton op takes up to 64 rows and beats both."""
    gm, _spec, cfg = _quantized(DECODE, "int8")
    assert gemv_pass.use_cuda_kernels(gm, cfg) == 0
    assert count(gm, INT8) == LINEARS and gemv_pass.libraries(gm) == []


@pytest.mark.parametrize(
    "change",
    [{"device": Device.CPU}, {"backend": Backend.ONNX}, {"quantization": "none"}],
    ids=["cpu", "onnx", "unquantized"],
)
def test_not_for_cpu_onnx_or_unquantized_builds(change, libraries):
    gm, _spec, cfg = _quantized(DECODE_B1, "int8")
    assert gemv_pass.use_cuda_kernels(gm, cfg.replace(**change)) == 0
    assert count(gm, INT8) == LINEARS


def test_not_for_float32_activations(libraries):
    """The kernels read bf16 or fp16 only."""
    gm, _spec, cfg = _quantized(DECODE_B1, "int8", dtype=torch.float32)
    assert gemv_pass.use_cuda_kernels(gm, cfg) == 0
    assert count(gm, INT8) == LINEARS


def test_a_library_that_does_not_compile_leaves_the_triton_op(monkeypatch, caplog):
    gm, _spec, cfg = _quantized(DECODE_B1, "int8")

    def fail(build_dir=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(gemv_pass, "_LIBRARIES", {})
    monkeypatch.setattr(gemv_pass.linear_int8_gemv, "load_extension", fail)
    assert gemv_pass.use_cuda_kernels(gm, cfg) == 0
    assert count(gm, INT8) == LINEARS and "nvcc not found" in caplog.text


def test_the_pipeline_runs_it_last_on_cuda_inductor_builds_only():
    cuda = _cuda_cfg("int8")
    # this config fuses no norms; the int8 tiles come after every pass that reads row-major weights
    assert [p.__name__ for p in pipeline(cuda)[-2:]] == ["use_cuda_kernels", "tile_int8_weights"]
    assert pipeline(cuda.replace(quant={"int8_tiles": False}))[-1] is gemv_pass.use_cuda_kernels
    int4 = pipeline(_cuda_cfg("int4").replace(fusion={"enable_norms": True}))
    assert int4[-3] is gemv_pass.use_cuda_kernels and int4[-2].__name__ == "fuse_norm_into_gemv"  # reads its ops
    assert gemv_pass.use_cuda_kernels not in pipeline(cuda.replace(quant={"enable_cuda_kernels": False}))
    assert gemv_pass.use_cuda_kernels not in pipeline(cuda.replace(device=Device.CPU))


def test_an_artifacts_library_loads_once(monkeypatch, tmp_path):
    loaded: list[str] = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(_cuda_extension, "_LOADED", set())
    for _ in range(2):  # the prefill and decode programs name the same library
        _cuda_extension.load_library(tmp_path / "oiv2_linear_int8_gemv_0.so")
    assert loaded == [str(tmp_path / "oiv2_linear_int8_gemv_0.so")]
