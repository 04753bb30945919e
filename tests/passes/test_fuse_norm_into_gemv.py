"""fold_norm_weights and fuse_norm_into_gemv: on an int8 or int4 CUDA build each fused add + RMSNorm
before a quantized linear hands its weight to that linear, and in the batch-1 decode program the add
runs in the quantized product before it and the norm in the one after it; the program computes what it
did with the norm apart. Here on the CPU, where the C++ ops run their references and the library
stands as a path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oiv2compile.capture import DECODE, DECODE_B1, PREFILL, CacheSpec, capture
from oiv2compile.config import Backend, BuildConfig, Device
from oiv2compile.models import load_model
from oiv2compile.passes import use_cuda_kernels as gemv_pass
from oiv2compile.passes.fold_norm_weights import fold_norm_weights
from oiv2compile.passes.fuse_norm_into_gemv import fuse_norm_into_gemv
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.quantize_weights import quantize_weights
from oiv2compile.passes.registry import pipeline
from oiv2compile.passes.tile_int8_weights import tile_int8_weights
from tests.passes.helpers import count, run_step, snapshot

NORM = torch.ops.oiv2.add_rms_norm.default
GEMV8 = torch.ops.oiv2.linear_int8_gemv.default
GEMV_ADD = torch.ops.oiv2.linear_int8_gemv_add.default
NORM_GEMV = torch.ops.oiv2.rms_norm_linear_int8_gemv.default
MMA = torch.ops.oiv2.linear_int4_mma.default
MMA_ADD = torch.ops.oiv2.linear_int4_mma_add.default
NORM_MMA = torch.ops.oiv2.rms_norm_linear_int4_mma.default
LAYERS = 2  # llama-tiny
# Each layer's post-attention norm and each later layer's input norm and the final norm (fuse_norms).
NORMS = 2 * LAYERS
# The final norm reaches the head through a slice (the last position): it keeps its weight.
FOLDED = NORMS - 1
# Readers of the folded norms with the projections unfused: gate and up, or q, k and v.
READERS = LAYERS * 2 + (LAYERS - 1) * 3


@pytest.fixture
def library(monkeypatch: pytest.MonkeyPatch) -> Path:
    path = Path("/x/oiv2_linear_int8_gemv_0.so")
    monkeypatch.setattr(gemv_pass, "_LIBRARIES", {"oiv2compile.kernels.linear_int8_gemv": path})
    return path


@pytest.fixture
def library4(monkeypatch: pytest.MonkeyPatch) -> Path:
    path = Path("/x/oiv2_linear_int4_mma_0.so")
    monkeypatch.setattr(gemv_pass, "_LIBRARIES", {"oiv2compile.kernels.linear_int4_mma": path})
    return path


def _cfg(**fusion: bool) -> BuildConfig:
    """int8 with the norm fusion alone (the gated activation's is tested in its own file)."""
    return BuildConfig(device=Device.CUDA, backend=Backend.INDUCTOR).replace(
        quantization="int8",
        fusion={"enable_norm_into_linear": True, "enable_gated_act_into_linear": False, **fusion},
    )


def _cfg4() -> BuildConfig:
    """int4 in groups of 64 (llama-tiny's widths are 64 and 128)."""
    return _cfg().replace(quantization="int4", quant={"group_size": 64})


UNFUSED = {"enable_qkv": False, "enable_ffn": False}


def _tiny_with_random_norms():  # type: ignore[no-untyped-def]
    """llama-tiny in bf16 with norm weights around 1 (HF initializes them to ones), and its cache spec."""
    hf = load_model("llama-tiny", dtype=torch.bfloat16, device="cpu", seed=0).model.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    for name, param in hf.named_parameters():
        if "norm" in name:
            param.data = (1 + 0.5 * torch.randn(param.shape, generator=gen)).to(param.dtype)
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=torch.bfloat16)
    return hf, spec


def _captured(program, fused_projections: bool = True):  # type: ignore[no-untyped-def]
    """llama-tiny in bf16 with random norm weights, its projections fused as the pipeline fuses them
    (or not), and its norms fused."""
    hf, spec = _tiny_with_random_norms()
    gm = capture(hf, spec, program).graph_module
    cfg = _cfg() if fused_projections else _cfg(**UNFUSED)
    for p in pipeline(cfg):
        if p is fold_norm_weights:
            break
        p(gm, cfg)
        cleanup(gm)
    assert count(gm, NORM) == NORMS
    return gm, spec


def _norm_weights(gm) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [
        getattr(gm.get_submodule(str(n.args[2].target).rpartition(".")[0]), str(n.args[2].target).rpartition(".")[2])
        for n in gm.graph.find_nodes(op="call_function", target=NORM)
    ]


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_the_norm_weights_fold_into_the_linears_and_the_program_computes_the_same():
    gm, spec = _captured(DECODE_B1, fused_projections=False)
    before = snapshot(gm)
    weights = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}

    assert fold_norm_weights(gm, _cfg(**UNFUSED)) == FOLDED
    cleanup(gm)

    assert sum(bool((w == 1).all()) for w in _norm_weights(gm)) == FOLDED
    folded = [n for n in gm.graph.nodes if "folded_norm" in n.meta.get("oiv2", {})]
    assert len(folded) == READERS
    names = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    assert sum(name.endswith("_norm_folded") for name in names) == READERS
    assert len(weights - names) == READERS + FOLDED  # the unfolded weights and norm weights are gone
    (want, _), (got, _) = run_step(before, spec), run_step(gm, spec)
    # bf16: W * g is rounded once more than the model rounds.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _quantized_decode(cfg: BuildConfig):  # type: ignore[no-untyped-def]
    """The batch-1 decode program through use_cuda_kernels: (it, its spec, the float program's logits,
    a copy of it before the norm fusion)."""
    gm, spec = _captured(DECODE_B1)
    float_logits, _ = run_step(snapshot(gm), spec)
    for p in (fold_norm_weights, quantize_weights, gemv_pass.use_cuda_kernels):
        p(gm, cfg)
        cleanup(gm)
    return gm, spec, float_logits, snapshot(gm)


def test_the_decode_programs_norms_run_in_the_int8_gemv(library):
    cfg = _cfg()
    gm, spec, float_logits, before = _quantized_decode(cfg)
    gemvs = 4 * LAYERS + 1  # qkv, o, gate/up, down, the head
    assert count(gm, NORM) == NORMS and count(gm, GEMV8) == gemvs

    # Between o and gate/up, and between down and the next qkv: the final norm reads no GEMV's output.
    assert fuse_norm_into_gemv(gm, cfg) == FOLDED
    cleanup(gm)
    assert count(gm, NORM) == NORMS - FOLDED and count(gm, GEMV_ADD) == FOLDED and count(gm, NORM_GEMV) == FOLDED
    assert count(gm, GEMV8) == gemvs - 2 * FOLDED
    for node in [
        *gm.graph.find_nodes(op="call_function", target=GEMV_ADD),
        *gm.graph.find_nodes(op="call_function", target=NORM_GEMV),
    ]:
        assert node.meta["oiv2"]["library"] == library.name and "quantized" in node.meta["oiv2"]
    for node in gm.graph.find_nodes(op="call_function", target=NORM_GEMV):
        assert "folded_norm" in node.meta["oiv2"] and node.args[0].target is GEMV_ADD
    assert gemv_pass.libraries(gm) == [library]
    (want, want_caches), (got, got_caches) = run_step(before, spec), run_step(gm, spec)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16, the norm's scalar applied later
    for a, b in zip(got_caches, want_caches, strict=True):  # k and v come from the fused qkv product
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert _sqnr_db(float_logits, got) >= 25  # int8 against the float program, logits of a random model


def test_the_decode_programs_norms_run_in_the_int4_products(library4):
    """int4: the tensor-core op takes the norm's input as it is (no reshape); the head (259 rows, not a
    multiple of 16) keeps the Triton op, so the final norm stays as with int8."""
    cfg = _cfg4()
    gm, spec, float_logits, before = _quantized_decode(cfg)
    products = 4 * LAYERS  # qkv, o, gate/up, down
    assert count(gm, NORM) == NORMS and count(gm, MMA) == products

    assert fuse_norm_into_gemv(gm, cfg) == FOLDED
    cleanup(gm)
    assert count(gm, NORM) == NORMS - FOLDED and count(gm, MMA_ADD) == FOLDED and count(gm, NORM_MMA) == FOLDED
    assert count(gm, MMA) == products - 2 * FOLDED
    for node in gm.graph.find_nodes(op="call_function", target=NORM_MMA):
        assert "folded_norm" in node.meta["oiv2"] and node.args[0].target is MMA_ADD
        assert node.meta["oiv2"]["library"] == library4.name
    (want, want_caches), (got, got_caches) = run_step(before, spec), run_step(gm, spec)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16, the norm's scalar applied later
    for a, b in zip(got_caches, want_caches, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert _sqnr_db(float_logits, got) >= 15  # int4 against the float program, logits of a random model


@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=lambda p: p.name)
def test_int4_programs_of_unfixed_rows_keep_their_norms(program, library4):
    """The int4 epilogues run in the streamed kernel alone (1 to 8 rows): prefill and the decode program
    of any batch keep the norm kernel, and read the same folded weights."""
    gm, _ = _captured(program)
    cfg = _cfg4()
    assert fold_norm_weights(gm, cfg) == FOLDED
    for p in (quantize_weights, gemv_pass.use_cuda_kernels):
        p(gm, cfg)
        cleanup(gm)
    assert count(gm, MMA) == 4 * LAYERS
    assert fuse_norm_into_gemv(gm, cfg) == 0 and count(gm, NORM) == NORMS


def test_a_model_as_initialized_needs_no_fold(library):
    """HF initializes norm weights to ones: nothing to fold, every norm before a product to fuse."""
    hf = load_model("llama-tiny", dtype=torch.bfloat16, device="cpu", seed=0).model.requires_grad_(False)
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=torch.bfloat16)
    gm = capture(hf, spec, DECODE_B1).graph_module
    cfg = _cfg()
    before = snapshot(gm)
    passes = pipeline(cfg)
    assert passes[-2:] == [fuse_norm_into_gemv, tile_int8_weights] and fold_norm_weights in passes
    counts = {}
    for p in passes:
        counts[p.__name__] = p(gm, cfg)
        cleanup(gm)
    assert counts["fold_norm_weights"] == 0 and counts["fuse_norm_into_gemv"] == FOLDED
    assert count(gm, NORM) == NORMS - FOLDED and count(gm, NORM_GEMV) == FOLDED
    (want, _), (got, _) = run_step(before, spec), run_step(gm, spec)
    assert _sqnr_db(want, got) >= 25


def test_prefill_keeps_its_norms_and_reads_the_same_folded_weights(library):
    gm, _ = _captured(PREFILL)
    cfg = _cfg()
    for p in (fold_norm_weights, quantize_weights, gemv_pass.use_cuda_kernels):
        p(gm, cfg)
        cleanup(gm)
    assert fuse_norm_into_gemv(gm, cfg) == 0  # no one-row products
    assert count(gm, NORM) == NORMS
    assert sum(str(n.target).endswith("_norm_folded_int8") for n in gm.graph.find_nodes(op="get_attr")) == FOLDED


@pytest.mark.parametrize(
    "change",
    [{"device": Device.CPU}, {"quantization": "none"}, {"quant": {"enable_cuda_kernels": False}}],
    ids=["cpu", "float", "no-cuda-kernels"],
)
def test_not_where_no_fused_kernel_wouldrun_step(change, library):
    gm, _ = _captured(DECODE_B1)
    cfg = _cfg().replace(**change)
    assert fold_norm_weights(gm, cfg) == 0 and fuse_norm_into_gemv(gm, cfg) == 0
    assert fold_norm_weights not in pipeline(cfg) and fuse_norm_into_gemv not in pipeline(cfg)
    off = _cfg(enable_norm_into_linear=False)
    assert BuildConfig().fusion.enable_norm_into_linear  # on by default; off only when asked
    assert fold_norm_weights not in pipeline(off) and fold_norm_weights(gm, off) == 0


def test_a_weight_read_twice_stays_unfolded():
    """A linear's weight that something else reads too (a tied table, say) keeps its values."""
    gm, _ = _captured(DECODE_B1)
    norm = gm.graph.find_nodes(op="call_function", target=NORM)[0]
    (linear,) = next(u for u in norm.users if u.args[1] == 0).users
    with gm.graph.inserting_after(linear):  # a second reader of the same attribute
        extra = gm.graph.get_attr(str(linear.args[1].target))
    with gm.graph.inserting_after(extra):
        gm.graph.call_function(torch.ops.aten.sum.default, (extra,))
    assert fold_norm_weights(gm, _cfg()) == FOLDED - 1


def _programs_with_random_norms(cfg: BuildConfig | None = None):  # type: ignore[no-untyped-def]
    """hf (bf16, random norm weights), its spec, and its prefill and decode programs after the
    int8 CUDA pipeline with this fusion on (or with cfg's)."""
    hf, spec = _tiny_with_random_norms()
    programs = {p.name: capture(hf, spec, p) for p in (PREFILL, DECODE, DECODE_B1)}
    cfg = cfg or _cfg()
    for captured in programs.values():
        for p in pipeline(cfg):
            p(captured.graph_module, cfg)
            cleanup(captured.graph_module)
    return hf, spec, programs


def test_the_int4_check_against_hf_passes_with_the_norms_in_the_products(library4):
    from oiv2compile.verify import verify_against_hf

    hf, spec, programs = _programs_with_random_norms(_cfg4())
    assert count(programs[DECODE_B1.name].graph_module, NORM_MMA) == FOLDED
    assert count(programs[DECODE.name].graph_module, NORM_MMA) == 0
    report = verify_against_hf(hf, programs, spec)
    assert max(report["relative_error"].values()) <= report["tolerance"]


def test_the_check_against_hf_passes_with_folded_weights_and_fails_without_their_record(library):
    """verify.py gives each HF linear the weight the quantized layout stands for: with the norm
    weight folded in, that weight divided by g. Without that division the same programs fail it."""
    from oiv2compile.errors import BuildError
    from oiv2compile.verify import verify_against_hf

    hf, spec, programs = _programs_with_random_norms()
    assert count(programs[DECODE_B1.name].graph_module, NORM_GEMV) == FOLDED
    report = verify_against_hf(hf, programs, spec)
    assert max(report["relative_error"].values()) <= report["tolerance"]
    for node in programs[PREFILL.name].graph_module.graph.nodes:
        node.meta.get("oiv2", {}).pop("folded_norm", None)
    with pytest.raises(BuildError, match="differs from Hugging Face"):
        verify_against_hf(hf, programs, spec)
