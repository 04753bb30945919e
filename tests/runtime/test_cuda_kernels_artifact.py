"""CUDA: an int8 artifact whose batch-1 decode program calls the C++ GEMV and whose prefill calls the C++
GEMM, and an int4 artifact whose
programs all call the tensor-core op (passes/use_cuda_kernels.py), through AOTInductor and CUDA graphs,
against the same build on the Triton kernels, and loaded in a fresh process from the library the
artifact carries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
