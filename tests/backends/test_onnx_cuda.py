"""CUDA: the onnx backend on ONNX Runtime's CUDA provider (needs onnxruntime-gpu): the decode program
attends in standard ops, the prefill program through GroupQueryAttention, and the artifact's logits
match Hugging Face's within float16 error."""

from __future__ import annotations

import json

import pytest
import torch

import oiv2compile
from oiv2compile.models import load_model
from tests.conftest import PROMPTS, TINY_BUILD

pytestmark = pytest.mark.cuda
ort = pytest.importorskip("onnxruntime")


def test_cuda_onnx_artifact_matches_hf(tmp_path):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    path = oiv2compile.build(
        "llama-tiny", tmp_path / "onnx", backend="onnx", device="cuda", dtype="float16", **TINY_BUILD
    )
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["programs"]["decode"]["attention_op"] == "standard ops"
    assert manifest["programs"]["prefill"]["attention_op"] == "GroupQueryAttention"
    engine = oiv2compile.load(path)
    hf = load_model("llama-tiny", dtype=torch.float32, device="cuda", seed=0).model
    prompt, rest = PROMPTS[0], [3, 14, 15, 92, 65, 35, 89, 79]
    ours = engine.logits_for(prompt, rest).float().cpu()  # the prefill, then decode steps
    ids = torch.tensor([prompt + rest], device="cuda")
    with torch.no_grad():
        want = hf(ids).logits[0, len(prompt) - 1 :].float().cpu()
    err = (ours.double() - want.double()).norm(dim=-1) / want.double().norm(dim=-1)
    assert float(err.max()) < 1e-2, err
