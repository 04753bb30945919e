"""CUDA: the Inductor artifact with CUDA-graph decode against Hugging Face, on a GPU."""

from __future__ import annotations

import pytest
import torch

import oiv2compile
from oiv2compile.models import load_model
from tests.conftest import PROMPTS, TINY_BUILD, hf_greedy

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_artifacts(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cuda")
    graphs = oiv2compile.build("llama-tiny", root / "graphs", device="cuda", dtype="float32", **TINY_BUILD)
    plain = oiv2compile.build(
        "llama-tiny",
        root / "plain",
        device="cuda",
        dtype="float32",
        cuda_graphs={"enable_capture": False},
        **TINY_BUILD,
    )
    return graphs, plain


def test_greedy_equals_hf_with_bucket_padding_and_batch1_program(cuda_artifacts):
    engine = oiv2compile.load(cuda_artifacts[0])
    assert engine.cuda_graph_buckets == (1, 2, 4)
    assert set(engine.manifest["programs"]) == {"prefill", "decode", "decode_b1"}
    hf = load_model("llama-tiny", dtype=torch.float32, device="cuda", seed=0).model
    expected = [hf_greedy(hf, p, 32) for p in PROMPTS]
    batch3 = engine.generate(PROMPTS, max_new_tokens=32, stop_token_ids=[])  # bucket 4, one padding row
    assert [r.token_ids for r in batch3] == expected
    for prompt, want in zip(PROMPTS, expected, strict=True):  # batch 1: the specialised program's graph
        assert engine.generate([prompt], max_new_tokens=32, stop_token_ids=[])[0].token_ids == want


def test_graphs_and_plain_calls_agree(cuda_artifacts):
    with_graphs = oiv2compile.load(cuda_artifacts[0])
    without = oiv2compile.load(cuda_artifacts[1])
    assert without.cuda_graph_buckets == ()
    a = with_graphs.generate(PROMPTS, max_new_tokens=16, temperature=0.8, seed=5, stop_token_ids=[])
    b = without.generate(PROMPTS, max_new_tokens=16, temperature=0.8, seed=5, stop_token_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_greedy_waves_in_the_graphs_stop_and_stream_as_plain_calls(cuda_artifacts):
    """A greedy wave replays the graph alone (the tokens picked inside it); stop tokens, streaming and
    the logits path that runs after it give what the artifact without graphs gives."""
    with_graphs = oiv2compile.load(cuda_artifacts[0])
    without = oiv2compile.load(cuda_artifacts[1])
    free = with_graphs.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[])
    stop = free[1].token_ids[5]
    a = with_graphs.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    b = without.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    assert [(r.token_ids, r.finish_reason) for r in a] == [(r.token_ids, r.finish_reason) for r in b]
    assert a[1].finish_reason == "stop" and len(a[1].token_ids) <= 6
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    for token in with_graphs.stream(PROMPTS, max_new_tokens=20, stop_token_ids=[stop]):
        streamed[token.index].append(token.token_id)
    assert streamed == [r.token_ids for r in a]
    prompt = with_graphs.prompt_ids(PROMPTS[0], 1)
    torch.testing.assert_close(
        with_graphs.logits_for(prompt, free[0].token_ids[:8]), without.logits_for(prompt, free[0].token_ids[:8])
    )
