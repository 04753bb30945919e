"""tile_int8_weights: in a CUDA int8 build every product-only int8 weight whose shape fits goes into
int8-tiles16x1024-v2, in every program (the Triton op of a dynamic batch too), under one name, each layer's
gate/up weight in the paired form (read by the gated product, or by a product before oiv2::gated_act); a head whose
rows do not fit, and a tied table's lookup, keep row-major; the program computes the same bits. Here on the
CPU, where the ops run their references and the libraries stand as paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from oiv2compile.capture import DECODE, DECODE_B1, PREFILL, CacheSpec, capture
from oiv2compile.config import Backend, BuildConfig, Device
from oiv2compile.kernels.linear_int8 import PAIRED_TILES_LAYOUT, TILES_LAYOUT
from oiv2compile.passes import use_cuda_kernels as gemv_pass
from oiv2compile.passes.manager import cleanup
from oiv2compile.passes.registry import pipeline
from oiv2compile.passes.tile_int8_weights import PRODUCTS, tile_int8_weights
from tests.passes.helpers import run_step, snapshot


@pytest.fixture
def libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled libraries stand as paths: no nvcc here."""
    names = ("linear_int8_gemv", "linear_int4_mma", "linear_int8_gemm")
    paths = {f"oiv2compile.kernels.{n}": Path(f"/x/oiv2_{n}_0.so") for n in names}
    monkeypatch.setattr(gemv_pass, "_LIBRARIES", paths)


def _model(vocab: int, tied: bool) -> LlamaForCausalLM:
    """A llama whose linears fit the tiles (K 128 and 256, N multiples of 16), in bf16."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)


def _built(program, vocab: int = 259, tied: bool = False):  # type: ignore[no-untyped-def]
    """The program through every pass of a CUDA int8 build but the tiles, and the config."""
    hf = _model(vocab, tied)
    spec = CacheSpec.for_model(hf.config, max_seq_len=32, max_batch_size=3, dtype=torch.bfloat16)
    gm = capture(hf, spec, program).graph_module
    cfg = BuildConfig(device=Device.CUDA, backend=Backend.INDUCTOR).replace(quantization="int8")
    passes = pipeline(cfg)
    assert passes[-1] is tile_int8_weights
    for p in passes[:-1]:
        p(gm, cfg)
        cleanup(gm)
    return gm, spec, cfg


def _qweights(gm) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The qweight of every int8 product, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in PRODUCTS:
            owner, _, leaf = str(node.args[1].target).rpartition(".")
            out.append(getattr(gm.get_submodule(owner), leaf))
    return out


@pytest.mark.parametrize("program", [DECODE_B1, DECODE, PREFILL], ids=["decode_b1", "decode", "prefill"])
def test_every_product_only_weight_that_fits_goes_into_tiles_and_the_program_computes_the_same(program, libraries):
    gm, spec, cfg = _built(program)
    before = snapshot(gm)
    products = len(_qweights(gm))
    assert products == 9  # 2 layers x (qkv, o, gate/up, down), fused, and the head
    assert tile_int8_weights(gm, cfg) == products - 1  # all but the head's 259 rows
    cleanup(gm)
    weights = _qweights(gm)
    assert [w.dim() for w in weights] == [3, 3, 4, 3] * 2 + [2] and weights[-1].shape == (259, 128)
    assert weights[2].shape == (512 // 16, 2, 8, 128)  # gate/up: 2 x 256 rows, paired
    layouts = [
        node.meta["oiv2"]["layout"]
        for node in gm.graph.nodes
        if node.op == "call_function" and node.target in PRODUCTS and node.args[1].target.endswith("_tiles")
    ]
    assert layouts == [TILES_LAYOUT, TILES_LAYOUT, PAIRED_TILES_LAYOUT, TILES_LAYOUT] * 2
    # The row-major tensors of the tiled weights are gone from the module (the artifact saves what is left).
    left = [n for n, b in gm.named_buffers() if b.dtype == torch.int8 and b.dim() == 2]
    assert all("lm_head" in n or "embed_tokens" in n for n in left)  # the head's, the table's
    (want, want_caches), (got, got_caches) = (
        run_step(before, spec, program is PREFILL),
        run_step(gm, spec, program is PREFILL),
    )
    assert torch.equal(got, want)
    for a, b in zip(got_caches, want_caches, strict=True):
        assert torch.equal(a, b)


def test_a_tied_tables_lookup_keeps_the_heads_row_major_weight(libraries):
    gm, _, cfg = _built(DECODE_B1, vocab=272, tied=True)
    products = len(_qweights(gm))
    assert tile_int8_weights(gm, cfg) == products - 1  # the head's 272 rows fit, but the lookup reads them
    cleanup(gm)
    assert _qweights(gm)[-1].shape == (272, 128)


def test_off_without_the_cuda_kernels_or_when_asked():
    cfg = BuildConfig(device=Device.CUDA, backend=Backend.INDUCTOR).replace(quantization="int8")
    assert tile_int8_weights in pipeline(cfg)
    assert tile_int8_weights not in pipeline(cfg.replace(quant={"int8_tiles": False}))
    assert tile_int8_weights not in pipeline(cfg.replace(quant={"enable_cuda_kernels": False}))
    assert tile_int8_weights not in pipeline(cfg.replace(device=Device.CPU))
