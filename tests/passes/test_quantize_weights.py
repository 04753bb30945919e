"""quantize_weights: which linears it rewrites, what it stores, and that the program then computes
what HF computes with the weights the quantized layout stands for."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.capture import DECODE, PREFILL
from oiv2compile.config import BuildConfig
from oiv2compile.errors import ConfigError
from oiv2compile.passes.registry import pipeline
from oiv2compile.verify import verify_against_hf
from tests.passes.helpers import aten, built_programs, count

INT8 = torch.ops.oiv2.linear_int8.default
INT4 = torch.ops.oiv2.linear_int4.default


UNFUSED = {"enable_qkv": False, "enable_ffn": False, "enable_norms": False}


@pytest.mark.parametrize(
    "preset, quant, group, fused",
    [
        ("llama-tiny", "int8", 128, True),
        ("llama-tiny", "int4", 32, True),
        ("qwen2-tiny", "int4", 64, True),
        ("qwen2-tiny", "int8", 128, False),
    ],
)
def test_every_linear_is_rewritten_and_matches_hf(preset, quant, group, fused):
    cfg = BuildConfig().replace(quantization=quant, quant={"group_size": group})
    cfg = cfg if fused else cfg.replace(fusion=UNFUSED)
    hf, spec, programs, records = built_programs(preset, cfg)
    op = INT8 if quant == "int8" else INT4
    # 2 layers x 7 + head; fused, 2 layers x (qkv, o, gate_up, down) + head.
    linears = 9 if fused else 15
    for name, program in programs.items():
        gm = program.graph_module
        assert {r.name: r.count for r in records[name]}["quantize_weights"] == linears
        assert count(gm, aten.linear.default) == 0 and count(gm, op) == linears
        params = dict(gm.named_parameters())
        assert not any(n.endswith("proj.weight") for n in params)  # the float weights are gone
        buffers = dict(gm.named_buffers())
        assert not any(n.endswith("proj.weight") for n in buffers)  # the fused float weights too
        suffix = "weight_int8" if quant == "int8" else "weight_int4"
        assert buffers[f"hf.model.layers.0.mlp.down_proj.{suffix}"].dtype == (
            torch.int8 if quant == "int8" else torch.uint8
        )
        fused_names = ("hf.model.layers.0.mlp.gate_up_proj", "hf.model.layers.1.self_attn.qkv_proj")
        assert all((f"{n}.{suffix}" in buffers) == fused for n in fused_names)
        # The head is quantized too, and (quantize_embedding, on by default) the lookup's table: no
        # float table stays, tied (qwen2-tiny) or not.
        read = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}  # what the artifact stores
        assert f"hf.lm_head.{suffix}" in read and not {"hf.lm_head.weight", "hf.model.embed_tokens.weight"} & read
    # Against HF with the weights the quantized layout stands for: a fused weight's rows go back to
    # the HF linears they came from, or the error would be the rounding's (~1e-2).
    report = verify_against_hf(hf, programs, spec)
    assert max(report["relative_error"].values()) < 1e-4


def test_the_output_head_can_stay_in_full_precision():
    cfg = BuildConfig().replace(quantization="int8", quant={"include_output_head": False})
    _, _, programs, _ = built_programs("llama-tiny", cfg)
    gm = programs[DECODE.name].graph_module
    assert count(gm, INT8) == 8 and count(gm, aten.linear.default) == 1
    head = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default)
    assert head.args[1].target == "hf.lm_head.weight"


def test_quantization_changes_the_numbers_by_the_expected_amount():
    """Against the float program: int8 barely moves the logits, int4 moves them more."""
    base_cfg = BuildConfig()
    _, spec, float_programs, _ = built_programs("llama-tiny", base_cfg)
    x = (torch.tensor([[5, 17, 99, 3]]), torch.tensor([0]), torch.tensor([0]), torch.tensor([3]))
    errs = {}
    for quant in ("int8", "int4"):
        _, _, programs, _ = built_programs("llama-tiny", base_cfg.replace(quantization=quant, quant={"group_size": 32}))
        ref = float_programs[PREFILL.name].graph_module(*x, spec.allocate("cpu"))
        out = programs[PREFILL.name].graph_module(*x, spec.allocate("cpu"))
        errs[quant] = float((out - ref).detach().norm() / ref.detach().norm())
    assert 0 < errs["int8"] < 0.02 < errs["int4"] < 0.5


def test_a_group_size_that_does_not_divide_the_features_is_refused():
    cfg = BuildConfig().replace(quantization="int4", quant={"group_size": 128})  # llama-tiny's hidden size is 64
    with pytest.raises(ConfigError, match="not a multiple of the int4 group size 128"):
        built_programs("llama-tiny", cfg)


def test_no_quantization_leaves_the_graph_alone():
    assert pipeline(BuildConfig())[-1].__name__ != "quantize_weights"


def test_a_bf16_int8_artifact_runs_on_cpu(tmp_path):
    """In bf16, Inductor rewrites `mm(x, convert(W_int8)) * scales` to aten._weight_int8pack_mm, whose
    AOTInductor CPU program crashed with a segmentation fault; the op's reference dequantizes first so
    that the rewrite never applies. Run in a child process: a crash must fail this test, not the run."""
    import subprocess
    import sys
    import zipfile

    import oiv2compile

    out = tmp_path / "int8-bf16"
    oiv2compile.build("llama-tiny", out, device="cpu", dtype="bfloat16", quantization="int8", max_batch_size=1)
    for package in ("prefill.pt2", "decode.pt2"):
        with zipfile.ZipFile(out / package) as archive:
            code = "".join(archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp"))
        assert code and "_weight_int8pack_mm" not in code
    script = f"import oiv2compile; r = oiv2compile.load({str(out)!r}).generate([[1, 2, 3]], max_new_tokens=4); print(len(r[0].token_ids))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "4"
