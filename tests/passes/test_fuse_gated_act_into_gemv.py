"""fuse_gated_act_into_gemv: in the batch-1 decode program of an int8 or int4 CUDA build, the gated
activation after each gate/up product that runs its norm goes into that product; the program computes
exactly what it did. int4: every program reads the gate/up weight with its rows interleaved, and the
others put the product back in order before the activation. Here on the CPU, where the C++ ops run
their references and the library stands as a path."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.capture import DECODE, DECODE_B1, PREFILL
from oiv2compile.config import BuildConfig
from oiv2compile.passes import use_cuda_kernels as gemv_pass
from oiv2compile.passes.fold_norm_weights import fold_norm_weights
from oiv2compile.passes.fuse_gated_act_into_gemv import fuse_gated_act_into_gemv
from oiv2compile.passes.fuse_norm_into_gemv import fuse_norm_into_gemv
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.quantize_weights import quantize_weights
from oiv2compile.passes.registry import pipeline
from oiv2compile.passes.tile_int8_weights import tile_int8_weights
from tests.passes.helpers import count, run_step, snapshot
from tests.passes.test_fuse_norm_into_gemv import (
    FOLDED,
    LAYERS,
    MMA,
    NORM_GEMV,
    NORM_MMA,
    _captured,
    _programs_with_random_norms,
    library,
    library4,
)
from tests.passes.test_fuse_norm_into_gemv import _cfg as _norm_cfg
from tests.passes.test_fuse_norm_into_gemv import _cfg4 as _norm_cfg4

__all__ = ["library", "library4"]  # the fixtures, used by name

GATED_ACT = torch.ops.oiv2.gated_act.default
NORM_GEMV_ACT = torch.ops.oiv2.rms_norm_linear_int8_gemv_gated_act.default
NORM_MMA_ACT = torch.ops.oiv2.rms_norm_linear_int4_mma_gated_act.default


def _cfg(**fusion: bool) -> BuildConfig:
    return _norm_cfg(**{"enable_gated_act_into_linear": True, **fusion})


def _cfg4() -> BuildConfig:
    return _norm_cfg4().replace(fusion={"enable_gated_act_into_linear": True})


def _gate_up_weights(gm) -> set[str]:  # type: ignore[no-untyped-def]
    """The gate/up tensors the program reads and those it holds (the artifact saves these)."""
    read = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    held = {name for name, _ in gm.named_buffers()} | {name for name, _ in gm.named_parameters()}
    return {name for name in read | held if "gate_up" in name}


def _through_norm_fusion(program, cfg):  # type: ignore[no-untyped-def]
    gm, spec = _captured(program)
    for p in (fold_norm_weights, quantize_weights, gemv_pass.use_cuda_kernels, fuse_norm_into_gemv):
        p(gm, cfg)
        cleanup(gm)
    return gm, spec


def _gated_decode(cfg, norm_product, gated_product, library):  # type: ignore[no-untyped-def]
    """The batch-1 program through the pass: each layer's gate/up product that runs its norm runs the
    activation too, and the program computes exactly what it did (the same reference computations)."""
    gm, spec = _through_norm_fusion(DECODE_B1, cfg)
    before = snapshot(gm)
    assert count(gm, GATED_ACT) == LAYERS and count(gm, norm_product) == FOLDED

    assert fuse_gated_act_into_gemv(gm, cfg) == LAYERS  # every layer's post-attention norm runs in gate/up
    cleanup(gm)
    assert count(gm, GATED_ACT) == 0 and count(gm, gated_product) == LAYERS
    assert count(gm, norm_product) == FOLDED - LAYERS  # the later layers' qkv
    nodes = gm.graph.find_nodes(op="call_function", target=gated_product)
    for node in nodes:
        facts = node.meta["oiv2"]
        assert facts["library"] == library.name and facts["activation"] == "silu" and "folded_norm" in facts
        assert node.meta["val"].shape[-1] * 2 == node.args[1].meta["val"].shape[0]
    (want, want_caches), (got, got_caches) = run_step(before, spec), run_step(gm, spec)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_caches, want_caches, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return gm, nodes


def test_each_layers_gated_activation_runs_in_its_gate_up_product(library):
    gm, _ = _gated_decode(_cfg(), NORM_GEMV, NORM_GEMV_ACT, library)
    assert gemv_pass.libraries(gm) == [library]


def test_prefill_keeps_its_activation(library):
    cfg = _cfg()
    gm, _ = _through_norm_fusion(PREFILL, cfg)
    assert fuse_gated_act_into_gemv(gm, cfg) == 0 and count(gm, GATED_ACT) == LAYERS


def test_in_the_pipeline_where_the_norm_fusion_runs_and_the_mlp_is_fused():
    assert pipeline(_cfg())[-3:] == [fuse_norm_into_gemv, fuse_gated_act_into_gemv, tile_int8_weights]
    assert BuildConfig().fusion.enable_gated_act_into_linear  # on by default; off only when asked
    assert fuse_gated_act_into_gemv not in pipeline(_norm_cfg())
    assert fuse_gated_act_into_gemv not in pipeline(_cfg(enable_ffn=False))
    assert fuse_gated_act_into_gemv not in pipeline(_cfg(enable_norm_into_linear=False))
    assert pipeline(_cfg4())[-3:] == [fuse_norm_into_gemv, fuse_gated_act_into_gemv, tile_int8_weights]


def test_the_check_against_hf_passes_with_the_activation_in_the_product(library):
    from oiv2compile.verify import verify_against_hf

    hf, spec, programs = _programs_with_random_norms(_cfg())
    assert count(programs[DECODE_B1.name].graph_module, NORM_GEMV_ACT) == LAYERS
    report = verify_against_hf(hf, programs, spec)
    assert max(report["relative_error"].values()) <= report["tolerance"]


def test_int4_each_layers_gated_activation_runs_in_its_gate_up_product(library4):
    gm, nodes = _gated_decode(_cfg4(), NORM_MMA, NORM_MMA_ACT, library4)
    for node in nodes:
        assert str(node.args[1].target).endswith("_interleaved")
        assert str(node.args[2].target).endswith("_interleaved_scale_zero")
    assert all("_interleaved" in name for name in _gate_up_weights(gm))  # the first order is read no more


@pytest.mark.parametrize("program", [PREFILL, DECODE], ids=lambda p: p.name)
def test_int4_programs_of_more_rows_read_the_interleaved_weight_and_reorder_its_product(program, library4):
    """Prefill and the decode program of any batch keep the activation kernel, but read the same
    interleaved weight as the batch-1 program (one copy in the artifact) and put the product back in
    gate-then-up order before the activation."""
    cfg = _cfg4()
    gm, _ = _through_norm_fusion(program, cfg)
    assert fuse_gated_act_into_gemv(gm, cfg) == 0
    cleanup(gm)
    assert count(gm, GATED_ACT) == LAYERS and count(gm, NORM_MMA_ACT) == 0
    assert all("_interleaved" in name for name in _gate_up_weights(gm))
    for act in gm.graph.find_nodes(op="call_function", target=GATED_ACT):
        ordered = act.args[0]
        assert ordered.target is torch.ops.aten.flatten.using_ints
        product = ordered.args[0].args[0].args[0]
        assert product.target is MMA and product.meta["oiv2"]["gate_up_rows"] == "interleaved by 8"


def test_int4_check_against_hf_passes_with_the_activation_in_the_product(library4):
    """All three programs after the int4 pipeline, against HF: the batch-1 program with the gated
    product, the others with the reordered product."""
    from oiv2compile.verify import verify_against_hf

    hf, spec, programs = _programs_with_random_norms(_cfg4())
    assert count(programs[DECODE_B1.name].graph_module, NORM_MMA_ACT) == LAYERS
    assert count(programs[PREFILL.name].graph_module, GATED_ACT) == LAYERS
    report = verify_against_hf(hf, programs, spec)
    assert max(report["relative_error"].values()) <= report["tolerance"]
