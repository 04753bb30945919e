"""Build-time checks that the transformed programs compute what the Hugging Face model computes.

Two checks guard against wrong tokens: every pass must rewrite exactly what each layer has (one
cache write per k and v cache, one attention, one fused q/k/v, gated MLP and pair of norms), and the transformed programs' logits must match HF's
own forward on a short random batch (two prompts of different lengths, then one decode step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from oiv2compile.capture import DECODE, DECODE_B1, PREFILL, CacheSpec, CapturedProgram
from oiv2compile.errors import BuildError, UnsupportedModelError
from oiv2compile.models import SUPPORTED_MODEL_TYPES
from oiv2compile.passes import PassRecord
from oiv2compile.passes.fx_utils import attr_tensors

# Relative L2 error of the logits against HF's own forward. float32 lands near 1e-6 and bfloat16 near
# 5e-3 on tiny random models; a wrong position, mask or cache row gives errors of order 1. A deep
# random model amplifies rounding: on the llama-8b preset (32 layers, bf16, H200, 2026-11-27) the
# programs landed at 4.5e-2 (int8: 5.9e-2, most likely because its kernel skips the rounding of the
# dequantized weight that the reference does; 4.3e-2 through the reference) while HF's own forward
# with sdpa attention and with eager attention differed by 5.3e-2. So in float16 and bfloat16 the
# bound also scales with HF's own noise, that difference of two roundings of the same model.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
NOISE_FACTOR = 2.0


def check_pass_counts(
    records: list[PassRecord],
    spec: CacheSpec,
    arch: str,
    program: str,
    linears_to_quantize: int = 0,
    embeddings_to_quantize: int = 0,
) -> None:
    counts = {r.name: r.count for r in records}
    # Each fused q, k, v leaves one linear of three, each fused gate and up one of two.
    fused_away = 2 * counts.get("fuse_qkv", 0) + counts.get("fuse_ffn", 0)
    expected = {
        "rewrite_kv_cache": (2 * spec.num_layers, "cache writes"),
        "substitute_attention": (spec.num_layers, "attention layers"),
        "fuse_qkv": (spec.num_layers, "q, k, v projection triples"),
        "fuse_rope_kv_write": (spec.num_layers, "rotary embeddings and cache writes"),
        # The decode programs' (one new token); prefill keeps its two kernels.
        "fuse_rope_into_attention": (
            0 if program == PREFILL.name else spec.num_layers,
            "rotary kernels before attention",
        ),
        "fuse_ffn": (spec.num_layers, "gated MLPs"),
        # The first layer's input norm has no residual add before it; the final norm has one.
        "fuse_norms": (2 * spec.num_layers, "residual adds followed by an RMSNorm"),
        "quantize_weights": (linears_to_quantize - fused_away, "linear layers"),
        "quantize_embedding": (embeddings_to_quantize, "token-embedding lookups"),
    }
    for record in records:
        if record.name not in expected:
            continue
        want, what = expected[record.name]
        if record.count != want:
            hint = (
                f"; build with --no-{record.name.replace('_', '-')} to skip that fusion"
                if record.name in _FUSIONS
                else ""
            )
            raise UnsupportedModelError(
                f"{arch}: {record.name} rewrote {record.count} of the {want} {what} in the {program} graph, "
                f"so this architecture is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}){hint}."
            )


_FUSIONS = ("fuse_qkv", "fuse_rope_kv_write", "fuse_rope_into_attention", "fuse_ffn", "fuse_norms")


@torch.no_grad()
def verify_against_hf(hf_model: Any, programs: dict[str, CapturedProgram], spec: CacheSpec) -> dict[str, Any]:
    device = next(hf_model.parameters()).device
    dtype = spec.torch_dtype
    vocab = hf_model.config.vocab_size
    batch = min(2, spec.max_batch_size)
    lengths = [min(n, spec.max_seq_len - 1) for n in (7, 4)][:batch]
    gen = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]

    caches = spec.allocate(device)
    input_ids = torch.zeros((batch, max(lengths)), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)] = p
    lengths_t = torch.tensor(lengths, device=device)
    slots = torch.arange(batch, device=device) + (spec.max_batch_size - batch)  # not row 0: slots must matter
    prefill = programs[PREFILL.name].graph_module
    decode = programs[DECODE.name].graph_module
    ours = {PREFILL.name: prefill(input_ids.to(device), torch.zeros_like(lengths_t), slots, lengths_t - 1, caches)}
    next_tokens = ours[PREFILL.name].argmax(-1)
    ours[DECODE.name] = decode(next_tokens[:, None], lengths_t, slots, torch.zeros_like(lengths_t), caches)
    if DECODE_B1.name in programs:
        # Rewrites the same cache position with the same values for the first sequence.
        one = slice(0, 1)
        ours[DECODE_B1.name] = programs[DECODE_B1.name].graph_module(
            next_tokens[one, None], lengths_t[one], slots[one], torch.zeros_like(lengths_t[one]), caches
        )

    worst = dict.fromkeys(ours, 0.0)
    noise = 0.0  # HF against itself, low precision only
    for i, prompt in enumerate(prompts):
        sequence = torch.cat([prompt.to(device), next_tokens[i : i + 1]])[None]
        with _dequantized_hf_weights(hf_model, prefill):
            ref = hf_model(input_ids=sequence, use_cache=False).logits[0]  # [len + 1, vocab]
            if dtype != torch.float32:
                with _attention_implementation(hf_model, "eager"):
                    other = hf_model(input_ids=sequence, use_cache=False).logits[0]
                noise = max(noise, *(_rel_err(other[p], ref[p]) for p in (lengths[i] - 1, lengths[i])))
        worst[PREFILL.name] = max(worst[PREFILL.name], _rel_err(ours[PREFILL.name][i], ref[lengths[i] - 1]))
        for name in ours.keys() - {PREFILL.name}:
            if i < ours[name].shape[0]:
                worst[name] = max(worst[name], _rel_err(ours[name][i], ref[lengths[i]]))
    tolerance = max(TOLERANCE[dtype], NOISE_FACTOR * noise)
    arch = type(hf_model).__name__
    for name, err in worst.items():
        if not err <= tolerance:  # NaN fails too
            raise BuildError(
                f"The transformed {arch} differs from Hugging Face's own forward in the {name} logits: relative "
                f"error {err:.2e}, above the {tolerance:.1e} allowed in {str(dtype).removeprefix('torch.')} "
                f"(HF's own sdpa and eager attention differ by {noise:.1e}). This is a bug in oiv2compile; "
                "--no-verify builds without this check."
            )
    return {"relative_error": worst, "tolerance": tolerance, "hf_noise": noise, "prompt_lengths": lengths}


@contextlib.contextmanager
def _attention_implementation(hf_model: Any, name: str) -> Iterator[None]:
    """HF's forward with another of its attention implementations (llama, mistral and qwen2 read the
    config's at each call)."""
    before = hf_model.config._attn_implementation
    hf_model.config._attn_implementation = name
    try:
        yield
    finally:
        hf_model.config._attn_implementation = before


@contextlib.contextmanager
def _dequantized_hf_weights(hf_model: Any, gm: torch.fx.GraphModule) -> Iterator[None]:
    """While inside, each HF linear or embedding whose weight the program reads quantized computes with
    the weight that the quantized layout stands for, so that the comparison checks the program, not
    the rounding. Linears and lookups are matched apart: a table tied to a quantized head but read
    in full precision by the lookup (--no-quantize-embedding) keeps its float weight there."""
    from oiv2compile.kernels.linear_int4 import dequantize as dequantize_int4
    from oiv2compile.kernels.linear_int4_mma import LAYOUT as MMA_LAYOUT
    from oiv2compile.kernels.linear_int4_mma import dequantize as dequantize_mma
    from oiv2compile.kernels.linear_int8 import dequantize as dequantize_int8
    from oiv2compile.kernels.rms_norm_linear_int4_mma_gated_act import INTERLEAVED, deinterleave

    # By the storage of the HF weight: the linears' and the lookups' apart.
    dequantized: dict[type, dict[int, torch.Tensor]] = {torch.nn.Linear: {}, torch.nn.Embedding: {}}
    for node in gm.graph.nodes:
        facts = node.meta.get("oiv2", {})
        if node.op != "call_function" or "quantized" not in facts:
            continue
        int8 = facts["scheme"] == "int8"
        mma = facts.get("layout") == MMA_LAYOUT
        # (qweight, scales), (packed, scale_zero) or (packed, scales, zeros)
        layout = node.args[1:3] if int8 or mma else node.args[1:4]
        tensors = attr_tensors(gm, list(layout))
        assert tensors is not None, f"{node.name}: the quantized layout is not stored in the program"
        dequantize = dequantize_int8 if int8 else dequantize_mma if mma else dequantize_int4
        weight = dequantize(*tensors)
        folded = facts.get("folded_norm")
        if folded is not None:  # fold_norm_weights moved the RMSNorm's weight into these columns
            weight = (weight.float() / folded.to(weight.device).float()).to(weight.dtype)
        if facts.get("gate_up_rows") == INTERLEAVED:  # fuse_gated_act_into_gemv: gate rows first again
            weight = deinterleave(weight.t()).t()
        # A fused weight (fuse_qkv, fuse_ffn) stands for several HF linears: each gets its rows.
        parts = facts.get("parts") or [(facts["storage"], weight.shape[0])]
        reader: type = torch.nn.Embedding if facts.get("lookup") else torch.nn.Linear
        for (storage, _), rows in zip(parts, weight.split([p[1] for p in parts]), strict=True):
            dequantized[reader][storage] = rows
    swapped = []
    for module in hf_model.modules():
        weights = next((w for reader, w in dequantized.items() if isinstance(module, reader)), {})
        stands_for = weights.get(module.weight.data_ptr()) if weights else None
        if stands_for is not None:
            swapped.append((module, module.weight))
            module.weight = torch.nn.Parameter(stands_for, requires_grad=False)
    try:
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))
