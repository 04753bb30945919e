"""CUDA: an int8 artifact whose batch-1 decode program calls the C++ GEMV and whose prefill calls the C++
GEMM, and an int4 artifact whose
programs all call the tensor-core op (passes/use_cuda_kernels.py), through AOTInductor and CUDA graphs,
against the same build on the Triton kernels, and loaded in a fresh process from the library the
artifact carries; an int8 artifact whose weights fit the tiles (int8-tiles16x1024-v2, gate/up paired)
against the same build with row-major weights: the same bits in every program."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import oiv2compile
from tests.conftest import PROMPTS, TINY_BUILD

pytestmark = pytest.mark.cuda

QUANT = {"int8": {}, "int4": {"group_size": 32}}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("gemv")
    built = {}
    for scheme, quant in QUANT.items():
        for gemv in (True, False):
            built[scheme, gemv] = oiv2compile.build(
                "llama-tiny",
                root / f"{scheme}-{gemv}",
                device="cuda",
                dtype="bfloat16",
                quantization=scheme,
                quant={**quant, "enable_cuda_kernels": gemv},
                # The rotary kernels inside the attention in the builds with the C++ kernels: checked
                # against the Triton builds, which keep them apart.
                fusion={"enable_rope_into_attention": gemv},
                **TINY_BUILD,
            )
    return built


@pytest.mark.parametrize("scheme", list(QUANT))
def test_batch1_decode_calls_the_gemv_and_agrees_with_the_triton_build(scheme, artifacts):
    path = artifacts[scheme, True]
    manifest = json.loads((path / "manifest.json").read_text())
    library = manifest["programs"]["decode_b1"]["libraries"]
    assert len(library) == 1 and (path / library[0]).is_file()
    passes = manifest["passes"]
    assert passes["decode_b1"]["use_cuda_kernels"]["count"] > 0
    # The norms between products run inside them: each layer's post-attention norm and the second
    # layer's input norm (llama-tiny's two layers), and each gate/up product its activation (int4: the
    # gate/up weight's rows interleaved, which prefill and the dynamic-batch decode read too).
    assert passes["decode_b1"]["fuse_norm_into_gemv"]["count"] == 3
    assert passes["decode_b1"]["fuse_gated_act_into_gemv"]["count"] == 2
    # Each decode program's rotary kernels run inside the attention; prefill keeps them.
    assert (
        passes["decode_b1"]["fuse_rope_into_attention"]["count"]
        == passes["decode"]["fuse_rope_into_attention"]["count"]
        == 2
    )
    assert passes["prefill"]["fuse_rope_into_attention"]["count"] == 0
    if scheme == "int8":  # one-row products and prefill's (the GEMM): a decode batch keeps the Triton op
        assert passes["decode"]["use_cuda_kernels"]["count"] == 0
        assert passes["prefill"]["use_cuda_kernels"]["count"] == passes["decode_b1"]["use_cuda_kernels"]["count"]
        (gemm,) = manifest["programs"]["prefill"]["libraries"]
        assert "linear_int8_gemm" in gemm and (path / gemm).is_file()
    else:  # every product whose weight fits the layout (llama-tiny's head of 259 rows does not)
        assert passes["decode"]["use_cuda_kernels"]["count"] == passes["prefill"]["use_cuda_kernels"]["count"] > 0
        assert manifest["quantization"]["layout"] == "int4-grouphalves-v2, int4-mma16x64-v1"
    with_gemv, triton = oiv2compile.load(path), oiv2compile.load(artifacts[scheme, False])
    prompt, rest = PROMPTS[0], [3, 14, 15, 92, 65]
    a, b = with_gemv.logits_for(prompt, rest), triton.logits_for(prompt, rest)  # teacher-forced, batch 1
    err = (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)
    assert float(err.max()) < 2e-2  # bf16: two kernels' summation orders
    assert torch.equal(with_gemv.logits_for(prompt, rest), a)  # the same bits every run
    batch = [PROMPTS[0], PROMPTS[1]]  # the dynamic-batch decode program
    assert [len(g.token_ids) for g in with_gemv.generate(batch, max_new_tokens=6)] == [6, 6]
    assert with_gemv.generate([prompt], max_new_tokens=8)[0].token_ids  # the CUDA-graph path runs


def test_an_artifact_loads_its_library_in_a_fresh_process(artifacts):
    code = (
        "import sys, oiv2compile; e = oiv2compile.load(sys.argv[1]); "
        "print(len(e.generate([[5, 17, 99]], max_new_tokens=4)[0].token_ids))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifacts["int8", True])], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "4"
    assert torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiled_artifacts(tmp_path_factory):  # type: ignore[no-untyped-def]
    """int8 builds, with and without the tiles, of a llama whose linears fit them (K 128 and 256, N multiples
    of 16; the head's 259 rows do not)."""
    root = tmp_path_factory.mktemp("tiles")
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    return {
        tiles: oiv2compile.build(
            root / "model",
            root / f"int8-{tiles}",
            device="cuda",
            dtype="bfloat16",
            quantization="int8",
            quant={"int8_tiles": tiles},
            **TINY_BUILD,
        )
        for tiles in (True, False)
    }


def test_int8_tiles_give_the_bits_of_row_major_weights_in_every_program(tiled_artifacts):
    """The kernels read the tiles with the same arithmetic (only the addresses change): prefill's GEMM, the
    batch-1 decode's streamed kernels and a decode batch's Triton op."""
    tiled, row_major = tiled_artifacts[True], tiled_artifacts[False]
    manifest = json.loads((tiled / "manifest.json").read_text())
    assert manifest["quantization"]["layout"] == "int8-rowmajor-v1, int8-tiles16x1024-paired-v2, int8-tiles16x1024-v2"
    for program in ("decode_b1", "decode", "prefill"):
        assert manifest["passes"][program]["tile_int8_weights"]["count"] == 8  # 2 layers x (qkv, o, gate/up, down)
    assert json.loads((row_major / "manifest.json").read_text())["quantization"]["layout"] == "int8-rowmajor-v1"
    a, b = oiv2compile.load(tiled), oiv2compile.load(row_major)
    prompt, rest = PROMPTS[0], [3, 14, 15, 92, 65]
    assert torch.equal(a.logits_for(prompt, rest), b.logits_for(prompt, rest))
    batch = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # the dynamic-batch decode program
    got, want = a.generate(batch, max_new_tokens=6), b.generate(batch, max_new_tokens=6)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
