"""The bundled trained models: they load offline, their card's figures hold, and an artifact of
tinycode matches Hugging Face token for token and by `oiv2compile eval`."""

from __future__ import annotations

import json
import re

import pytest
import torch

import oiv2compile
from oiv2compile import datasets
from oiv2compile.accuracy import evaluate, summary
from oiv2compile.cli import main
from oiv2compile.models import BUNDLED_MODELS, TINYCODE_HELDOUT, load_model
from tests.conftest import hf_greedy

CODE_PROMPTS = [
    "def fibonacci(n):\n    if n",
    "import os\n\n\ndef list_files(path):",
    "class Stack:\n    def push(self",
]


@pytest.fixture(scope="module")
def tinycode_hf():  # type: ignore[no-untyped-def]
    return load_model("tinycode", dtype=torch.float32, device="cpu", seed=0)


@pytest.mark.parametrize("name, limit", [("tinycode", 16_000_000), ("tinycode-draft", 4_000_000)])
def test_bundled_models_load_offline_with_transformers(name, limit, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = BUNDLED_MODELS[name]
    assert sum(p.stat().st_size for p in path.iterdir()) <= limit
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok) == 4096
    assert next(model.parameters()).dtype == torch.bfloat16  # as stored
    code = "def add(a, b):\n    return a + b\n"
    ids = tok(code)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == code
    assert len(ids) < len(code) / 2  # a real BPE vocabulary, not bytes


def test_both_models_share_one_tokenizer_and_the_recorded_corpus():
    tokenizers = {(BUNDLED_MODELS[n] / "tokenizer.json").read_bytes() for n in BUNDLED_MODELS}
    assert len(tokenizers) == 1
    record = json.loads((BUNDLED_MODELS["tinycode"] / "training_data.json").read_text())
    files = [datasets.SourceFile(**f) for f in record["files"]]
    assert datasets.corpus_digest(files) == record["digest"]
    assert all(f.split == datasets.split_of(f.path) for f in files)
    heldout = datasets.read_heldout(TINYCODE_HELDOUT)
    assert [(p, datasets.hashlib.sha256(t.encode()).hexdigest()) for p, t in heldout] == [
        (f.path, f.sha256) for f in files if f.split == "heldout"
    ]
    assert len(heldout) >= 0.03 * len(files)


@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_model_card_perplexity_is_far_below_the_unigram_baseline(name):
    card = (BUNDLED_MODELS[name] / "README.md").read_text()
    model_ppl = float(re.search(rf"^\| {re.escape(name)} \| ([\d.]+) \|$", card, re.M).group(1))
    unigram = float(re.search(r"^\| unigram baseline[^|]*\| ([\d.]+) \|$", card, re.M).group(1))
    assert model_ppl < unigram / 10
    assert card.split("## Samples")[1].split("## Use")[0].count("```python") == 3  # three sample completions


def test_model_card_perplexity_on_a_slice(tinycode_hf):
    """Recompute the held-out perplexity on the first windows: close to the card's full figure."""
    tok, model = tinycode_hf.tokenizer, tinycode_hf.model
    stream = datasets.token_stream(tok, [text for _, text in datasets.read_heldout(TINYCODE_HELDOUT)[:6]])
    windows = torch.tensor(datasets.token_windows(stream, 256, max_windows=6))
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert 2.0 < float(nll.exp()) < 20.0  # the card's 6.4 over all files; random weights would give ~4096


def test_tinycode_artifact_greedy_equals_hugging_face(artifacts, tinycode_hf):
    engine = oiv2compile.load(artifacts("tinycode"))
    tok = tinycode_hf.tokenizer
    results = engine.generate(CODE_PROMPTS, max_new_tokens=32, stop_token_ids=[])
    for prompt, result in zip(CODE_PROMPTS, results, strict=True):
        expected = hf_greedy(tinycode_hf.model, tok(prompt)["input_ids"], 32)
        assert result.token_ids == expected
        assert result.text == tok.decode(expected, skip_special_tokens=True)
    assert "return" in results[0].text  # trained weights write code


def test_eval_of_an_fp32_artifact_matches_the_reference(artifacts):
    result = evaluate(artifacts("tinycode"), window=64, max_windows=6)
    assert result["data"] == {
        "source": "the tinycode held-out files",
        "files": len(datasets.read_heldout(TINYCODE_HELDOUT)),
        "tokens": result["data"]["tokens"],
        "window": 64,
        "windows": 6,
        "positions_scored": 6 * 63,
    }
    assert result["data"]["tokens"] > 300_000
    ppl = result["perplexity"]
    assert 1.0 < ppl["reference"] < 50.0
    assert abs(ppl["relative_difference"]) < 1e-3
    assert result["next_token_agreement"] >= 0.99
    assert 0.2 < result["top1_accuracy"]["reference"] <= 1.0
    assert result["reference"]["dtype"] == "float32"
    assert "next-token agreement" in summary(result)


def test_eval_cli_json_and_errors(artifacts, capsys, tmp_path):
    report = tmp_path / "eval.json"
    code = main(["eval", str(artifacts("tinycode")), "--window", "32", "--max-windows", "2", "--json", str(report)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("\n") == 1 and "perplexity" in out
    assert json.loads(report.read_text())["data"]["positions_scored"] == 2 * 31

    # A random-weight preset has no reference and no default data: one sentence, exit 2.
    code = main(["eval", str(artifacts("llama-tiny")), "--max-windows", "1"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("oiv2compile: error:") == 1 and "--reference" in err
    code = main(["eval", str(artifacts("tinycode")), "--window", "4096"])
    _, err = capsys.readouterr()
    assert code == 2 and "cache positions" in err
    code = main(["eval", str(artifacts("tinycode")), "--data", str(tmp_path / "missing")])
    _, err = capsys.readouterr()
    assert code == 2 and "does not exist" in err


@pytest.mark.cuda
def test_bf16_cuda_artifact_tracks_the_fp32_reference(tmp_path):
    out = oiv2compile.build("tinycode", tmp_path / "bf16", device="cuda", dtype="bfloat16", max_seq_len=256)
    result = evaluate(out, window=256, max_windows=16)
    assert result["artifact"]["device"].startswith("cuda") and result["reference"]["dtype"] == "float32"
    assert abs(result["perplexity"]["relative_difference"]) < 0.02
    assert result["next_token_agreement"] >= 0.95


def test_run_echoes_the_prompt_before_the_completion(artifacts, capsys):
    prompt = "def fibonacci(n):\n    if n"
    assert main(["run", str(artifacts("tinycode")), "--echo", "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(out) > len(prompt) + 4


@pytest.mark.parametrize("quant, group, ppl_rise, agreement", [("int8", 128, 0.01, 0.95), ("int4", 64, 0.10, 0.7)])
def test_quantized_tinycode_artifacts(artifacts, quant, group, ppl_rise, agreement):
    """Weight-only quantized artifacts of the trained model: smaller, recorded, and close to the
    reference on held-out code (the full-data figures are in benchmarks/RESULTS.md)."""
    path = artifacts("tinycode", quantization=quant, quant={"group_size": group})
    manifest = oiv2compile.load(path).manifest
    record = manifest["quantization"]
    # 4 layers of (fused qkv, o, fused gate_up, down), and the head.
    assert record["scheme"] == quant and record["linears"] == 4 * 4 + 1 and record["output_head"]
    assert record["embedding"]  # the tied table is read from the head's quantized tensors
    assert record["layout"].startswith(quant) and record["group_size"] == (group if quant == "int4" else None)
    full = oiv2compile.load(artifacts("tinycode")).manifest["weights"]["bytes"]
    assert manifest["weights"]["bytes"] < 0.5 * full

    result = evaluate(path, window=64, max_windows=6)
    assert result["artifact"]["quantization"]["scheme"] == quant
    assert abs(result["perplexity"]["relative_difference"]) < ppl_rise
    assert result["next_token_agreement"] >= agreement
