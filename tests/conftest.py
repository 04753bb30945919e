"""Shared fixtures: tiny artifacts built once per session, and the cuda marker's skip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import oiv2compile
from oiv2compile.models import load_model

# Small enough for the 2-core CI machine, large enough for three prompts and 32 new tokens.
TINY_BUILD = dict(max_seq_len=128, max_batch_size=4)
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [11, 200], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with `make test-cuda` on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Build an artifact once per (preset, backend, other build options) and reuse it across tests."""
    built: dict[str, Path] = {}

    def get(preset: str, backend: str = "inductor", **overrides: Any) -> Path:
        key = f"{preset}-{backend}" + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
        if key not in built:
            out = tmp_path_factory.mktemp("artifacts") / f"{preset}-{backend}"
            options = {**TINY_BUILD, **overrides}
            oiv2compile.build(preset, out, backend=backend, device="cpu", dtype="float32", **options)
            built[key] = out
        return built[key]

    return get


@pytest.fixture(scope="session")
def hf_tiny():  # type: ignore[no-untyped-def]
    """The Hugging Face model behind each tiny preset (same seed as the build), fp32 on CPU."""
    cache = {}

    def get(preset: str):  # type: ignore[no-untyped-def]
        if preset not in cache:
            cache[preset] = load_model(preset, dtype=torch.float32, device="cpu", seed=0).model
        return cache[preset]

    return get


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Hugging Face's own greedy generation for one prompt (no padding), new tokens only."""
    device = next(model.parameters()).device
    out = model.generate(
        torch.tensor([prompt], device=device),
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()
