"""The executor: batching, streaming, stop tokens, sampling, teacher-forced logits, bad requests."""

from __future__ import annotations

import pytest
import torch

import oiv2compile
from oiv2compile.errors import InvalidRequestError
from tests.conftest import PROMPTS, hf_greedy


@pytest.fixture(scope="module")
def engine(artifacts):  # type: ignore[no-untyped-def]
    return oiv2compile.load(artifacts("llama-tiny"))


def test_more_prompts_than_the_batch_run_in_waves(engine, hf_tiny):
    prompts = [[i + 1, 2 * i + 3, 7] for i in range(6)]  # max_batch_size is 4
    got = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[])
    assert [r.token_ids for r in got] == [hf_greedy(hf_tiny("llama-tiny"), p, 8) for p in prompts]


def test_stream_yields_what_generate_returns(engine):
    expected = [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])]
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    for token in engine.stream(PROMPTS, max_new_tokens=10, stop_token_ids=[]):
        streamed[token.index].append(token.token_id)
    assert streamed == expected


def test_stop_tokens_end_each_sequence(engine):
    free = engine.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[])
    stop = free[0].token_ids[5]
    got = engine.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    first = free[0].token_ids.index(stop)
    assert got[0].token_ids == free[0].token_ids[: first + 1] and got[0].finish_reason == "stop"
    for before, after in zip(free[1:], got[1:], strict=True):
        if stop in before.token_ids:
            assert after.token_ids == before.token_ids[: before.token_ids.index(stop) + 1]
        else:
            assert after.token_ids == before.token_ids and after.finish_reason == "length"


def test_text_prompts_and_timings(engine):
    result = engine.generate(["def add(a, b):"], max_new_tokens=6, stop_token_ids=[])[0]
    assert result.prompt_tokens == len(b"def add(a, b):")
    assert isinstance(result.text, str)
    assert len(result.token_times_s) == 6 and all(t > 0 for t in result.token_times_s)
    assert result.time_to_first_token_s == result.token_times_s[0]
    assert result.decode_tokens_per_s > 0


def test_sampling_is_seeded(engine):
    a = engine.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    b = engine.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    greedy = engine.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    top1 = engine.generate(PROMPTS, max_new_tokens=12, temperature=0.7, top_k=1, seed=1, stop_token_ids=[])
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def test_teacher_forced_logits_match_hf(engine, hf_tiny):
    prompt, continuation = PROMPTS[0], [9, 8, 7, 6]
    ours = engine.logits_for(prompt, continuation)
    with torch.no_grad():
        ref = hf_tiny("llama-tiny")(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, "non-empty list of prompts"),
        ("just a string", {}, "non-empty list of prompts"),
        ([[]], {}, "Prompt 0 is empty"),
        ([""], {}, "Prompt 0 is empty"),
        ([[1, 2], [1] * 129], {"max_new_tokens": 1}, "Prompt 1 has 129 tokens but the artifact's max_seq_len is 128"),
        ([[1] * 100], {"max_new_tokens": 29}, r"plus max_new_tokens=29 needs 129 cache positions"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be"),
        ([[1, 100000]], {}, "outside the vocabulary"),
        ([[1, -1]], {}, "outside the vocabulary"),
        ([[1, 2]], {"temperature": -0.5}, "temperature"),
    ],
)
def test_bad_requests(engine, prompts, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate(prompts, **kwargs)


def test_text_without_tokenizer(tmp_path):
    from oiv2compile.models import load_model

    hf = load_model("llama-tiny", dtype=torch.float32, device="cpu", seed=0).model
    out = oiv2compile.build(hf, tmp_path / "a", backend="eager", device="cpu", max_seq_len=32, max_batch_size=1)
    engine = oiv2compile.load(out)
    with pytest.raises(InvalidRequestError, match="has no tokenizer"):
        engine.generate(["hello"])
    assert engine.generate([[1, 2, 3]], max_new_tokens=3, stop_token_ids=[])[0].text is None
