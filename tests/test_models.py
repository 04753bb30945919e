"""Model sources: presets, directories, objects, and the byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.errors import ModelNotFoundError, UnsupportedModelError
from oiv2compile.models import PRESETS, byte_tokenizer, load_model


def test_presets_have_public_shapes():
    assert {"llama-tiny", "llama-1b", "llama-8b", "llama2-7b", "mistral-7b", "qwen2-0.5b"} <= set(PRESETS)
    from transformers import AutoConfig

    fields = dict(PRESETS["llama-8b"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Meta-Llama-3-8B


def test_tiny_preset_is_seeded():
    a = load_model("llama-tiny", dtype=torch.float32, device="cpu", seed=1)
    b = load_model("llama-tiny", dtype=torch.float32, device="cpu", seed=1)
    assert a.source == "preset:llama-tiny" and a.tokenizer is not None
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = "def f(x):\n    return x * 2  # ünïcode"
    ids = tok(text)["input_ids"]
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_directory_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope", dtype=torch.float32, device="cpu", seed=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        load_model(tmp_path / "file", dtype=torch.float32, device="cpu", seed=0)
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        load_model(tmp_path, dtype=torch.float32, device="cpu", seed=0)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        load_model(tmp_path, dtype=torch.float32, device="cpu", seed=0)


def test_directory_round_trip_with_tokenizer(tmp_path):
    loaded = load_model("qwen2-tiny", dtype=torch.float32, device="cpu", seed=0)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_model(tmp_path, dtype=torch.float32, device="cpu", seed=0)
    assert again.source == str(tmp_path.resolve())
    assert again.tokenizer is not None and again.tokenizer_note == "from the model directory"
    for p, q in zip(loaded.model.parameters(), again.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_non_causal_model_directory_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        load_model(tmp_path, dtype=torch.float32, device="cpu", seed=0)
