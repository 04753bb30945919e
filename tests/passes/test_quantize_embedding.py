"""quantize_embedding: the lookup reads the quantized table (the head's, where tied), the float table
goes, and the program computes what HF computes with the table the layout stands for."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.capture import DECODE, PREFILL
from oiv2compile.config import BuildConfig
from oiv2compile.models import load_model
from oiv2compile.verify import verify_against_hf
from tests.passes.helpers import aten, built_programs, count

LOOKUP = {"int8": torch.ops.oiv2.embedding_int8.default, "int4": torch.ops.oiv2.embedding_int4.default}


@pytest.mark.parametrize(
    "preset, quant, tied",
    [("llama-tiny", "int4", False), ("mistral-tiny", "int8", False), ("qwen2-tiny", "int4", True)],
)
def test_the_lookup_reads_the_quantized_table_and_matches_hf(preset, quant, tied):
    cfg = BuildConfig().replace(quantization=quant, quant={"group_size": 32})
    hf, spec, programs, records = built_programs(preset, cfg)
    suffix = f"weight_{quant}"
    for name, program in programs.items():
        gm = program.graph_module
        assert {r.name: r.count for r in records[name]}["quantize_embedding"] == 1
        assert count(gm, aten.embedding.default) == 0 and count(gm, LOOKUP[quant]) == 1
        lookup = next(n for n in gm.graph.nodes if n.target == LOOKUP[quant])
        table = "hf.lm_head" if tied else "hf.model.embed_tokens"
        assert lookup.args[1].target == f"{table}.{suffix}"  # the head's tensors where tied
        read = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}  # what the artifact stores
        assert not {"hf.model.embed_tokens.weight", "hf.lm_head.weight"} & read  # no float table left
        params = dict(gm.named_parameters(remove_duplicate=False))  # what the artifact saves
        assert not {"hf.model.embed_tokens.weight", "hf.lm_head.weight"} & set(params)  # nor its tied name
        assert sum(n.endswith(suffix) and ("embed" in n or "lm_head" in n) for n in read) == (1 if tied else 2)
    report = verify_against_hf(hf, programs, spec)
    assert max(report["relative_error"].values()) < 1e-4


def test_the_table_keeps_most_of_its_signal():
    """SQNR of the looked-up rows against the float table: the same floors as the linear layers."""
    hf = load_model("llama-tiny", dtype=torch.float32, device="cpu", seed=0).model
    table = hf.model.embed_tokens.weight.detach()
    ids = torch.arange(table.shape[0])[None, :]  # every row, [1, V]
    want = table[ids]
    from oiv2compile.kernels import embedding_int4, embedding_int8
    from oiv2compile.kernels.linear_int4 import quantize as quantize_int4
    from oiv2compile.kernels.linear_int8 import quantize as quantize_int8

    def sqnr(got: torch.Tensor) -> float:
        return float(10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()))

    assert sqnr(embedding_int8(ids, *quantize_int8(table, torch.float32))) >= 40
    assert sqnr(embedding_int4(ids, *quantize_int4(table, 32, torch.float32))) >= 20


@pytest.mark.parametrize(
    "overrides",
    [{"quantization": "none"}, {"quantization": "int8", "quant": {"include_embedding": False}}],
    ids=["no-quantization", "embedding-off"],
)
def test_it_does_not_fire_when_not_asked(overrides):
    cfg = BuildConfig().replace(**overrides)
    _, _, programs, records = built_programs("llama-tiny", cfg)
    gm = programs[PREFILL.name].graph_module
    assert "quantize_embedding" not in {r.name for r in records[PREFILL.name]}
    assert count(gm, aten.embedding.default) == 1 and "hf.model.embed_tokens.weight" in dict(gm.named_parameters())


def test_a_tied_table_stays_float_when_the_head_does():
    """qwen2-tiny ties its table to the head: with the head in full precision a quantized copy of the
    table would add bytes, not save them, so the lookup stays as it is."""
    cfg = BuildConfig().replace(quantization="int4", quant={"group_size": 32, "include_output_head": False})
    _, _, programs, records = built_programs("qwen2-tiny", cfg)
    gm = programs[DECODE.name].graph_module
    assert {r.name: r.count for r in records[DECODE.name]}["quantize_embedding"] == 0
    assert count(gm, aten.embedding.default) == 1 and count(gm, LOOKUP["int4"]) == 0


def test_a_float_lookup_of_a_table_tied_to_a_quantized_head_verifies():
    """--no-quantize-embedding on a tied model: the head reads the quantized table, the lookup the float
    one; verification must give HF's head the dequantized weight and leave its lookup float."""
    cfg = BuildConfig().replace(quantization="int4", quant={"group_size": 32, "include_embedding": False})
    hf, spec, programs, _ = built_programs("qwen2-tiny", cfg)
    gm = programs[PREFILL.name].graph_module
    assert count(gm, aten.embedding.default) == 1 and count(gm, torch.ops.oiv2.linear_int4.default) == 9
    report = verify_against_hf(hf, programs, spec)
    assert max(report["relative_error"].values()) < 1e-4
