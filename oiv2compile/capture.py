"""Capture: the HF model's forward with the executor's static KV cache, exported with torch.export.

Both programs take the same inputs and return the logits of one position per sequence:

    input_ids  [B, S] int64   new tokens (prefill: right-padded prompts; decode: S == 1)
    positions  [B]    int64   absolute position of each sequence's first new token
    slots      [B]    int64   the cache row each sequence lives in
    last_index [B]    int64   which of the S new tokens to return logits for
    caches     2 * num_layers tensors [num_slots, num_kv_heads, max_seq_len, head_dim]: k0, v0, k1, ...
    -> logits  [B, vocab]

The caches belong to the executor and are written in place, so one artifact serves any batch
composition and CUDA graphs see stable addresses. The captured graph writes the cache with
index_put_ and attends over whole cache rows through a causal mask built from `positions`; the
passes then turn those into oiv2 ops that read only the filled part.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from oiv2compile._torch_compat import unlift
from oiv2compile.errors import UnsupportedModelError
from oiv2compile.models import SUPPORTED_MODEL_TYPES

INPUT_NAMES = ("input_ids", "positions", "slots", "last_index")


class Phase(str, enum.Enum):
    PREFILL = "prefill"  # dynamic batch and prompt length
    DECODE = "decode"  # one new token per sequence


@dataclass(frozen=True)
class ProgramSpec:
    """One program of the artifact: its name (and file stem), its phase, and a batch size it is
    specialised for (None: dynamic up to max_batch_size)."""

    name: str
    phase: Phase
    static_batch: int | None = None


PREFILL = ProgramSpec("prefill", Phase.PREFILL)
DECODE = ProgramSpec("decode", Phase.DECODE)
# Decode specialised for one sequence: with the batch known to be 1, Inductor turns each linear into
# a matrix-vector reduction that it tunes for bandwidth (coordinate-descent tuning), which beats
# cuBLAS's matrix product at M = 1.
DECODE_B1 = ProgramSpec("decode_b1", Phase.DECODE, static_batch=1)


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    max_batch_size: int
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @property
    def num_slots(self) -> int:
        # One row per sequence of a full batch, plus a scratch row that padding rows of a CUDA-graph
        # batch bucket write into.
        return self.max_batch_size + 1

    @property
    def scratch_slot(self) -> int:
        return self.max_batch_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_slots, self.num_kv_heads, self.max_seq_len, self.head_dim)

    def allocate(self, device: torch.device | str) -> list[torch.Tensor]:
        return [torch.zeros(self.shape(), dtype=self.torch_dtype, device=device) for _ in range(2 * self.num_layers)]

    def bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        return cls(**data)

    @classmethod
    def for_model(cls, config: Any, *, max_seq_len: int, max_batch_size: int, dtype: torch.dtype) -> CacheSpec:
        heads = getattr(config, "num_attention_heads", None)
        layers = getattr(config, "num_hidden_layers", None)
        if not heads or not layers:
            raise UnsupportedModelError(
                f"{config.model_type} models have no attention layers that oiv2compile can give a KV cache; "
                f"supported architectures: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            num_layers=layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            dtype=str(dtype).removeprefix("torch."),
        )


class _SlotCache:
    """Stands in for a transformers Cache: each layer's update writes the new keys and values into
    the executor's cache rows and hands attention the whole rows of the batch's sequences."""

    def __init__(self, caches: list[torch.Tensor], slots: torch.Tensor, position_ids: torch.Tensor) -> None:
        self.caches = caches
        self.slots = slots
        self.position_ids = position_ids  # [B, S]
        self.is_compileable = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        k_cache, v_cache = self.caches[2 * layer_idx], self.caches[2 * layer_idx + 1]
        heads = torch.arange(key_states.shape[1], device=key_states.device)
        index = (self.slots[:, None, None], heads[None, :, None], self.position_ids[:, None, :])  # -> [B, H, S]
        k_cache.index_put_(index, key_states)
        v_cache.index_put_(index, value_states)
        return k_cache[self.slots], v_cache[self.slots]  # [B, H, T, D]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise UnsupportedModelError("the model asked its cache for a sequence length, which capture cannot give")


class CaptureModule(nn.Module):
    """The exported forward: HF's own CausalLM forward over the executor's cache, so that whatever
    the model does to its logits (soft-capping, scaling) is part of the program."""

    def __init__(self, hf_model: Any, spec: CacheSpec, phase: Phase) -> None:
        super().__init__()
        self.hf = hf_model
        self.max_seq_len = spec.max_seq_len
        self.phase = phase
        # HF's eager attention adds the mask to the scores; sdpa takes a boolean mask.
        self.additive_mask = hf_model.config._attn_implementation == "eager"

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        last_index: torch.Tensor,
        caches: list[torch.Tensor],
    ) -> torch.Tensor:
        B, S = input_ids.shape
        device = input_ids.device
        position_ids = positions[:, None] + torch.arange(S, device=device)[None, :]  # [B, S]
        kv_pos = torch.arange(self.max_seq_len, device=device)
        visible = kv_pos[None, None, None, :] <= position_ids[:, None, :, None]  # [B, 1, S, T]
        if self.additive_mask:
            dtype: torch.dtype = self.hf.dtype
            mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
        else:
            mask = visible
        # Decode has one new token per sequence. Prefill keeps, for every sequence, the positions
        # of all sequences' last tokens ([B, B, vocab]: B is at most max_batch_size) and takes the
        # diagonal, since HF's logits_to_keep selects the same positions in every row.
        keep: int | torch.Tensor = 1 if self.phase is Phase.DECODE else last_index
        logits = self.hf(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=_SlotCache(caches, slots, position_ids),
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        if self.phase is Phase.DECODE:
            return logits[:, 0]  # [B, vocab]
        rows = torch.arange(B, device=device)
        return logits[rows, rows]  # [B, vocab]


@dataclass
class CapturedProgram:
    program: ProgramSpec
    graph_module: torch.fx.GraphModule
    example_inputs: tuple[Any, ...]
    dynamic_shapes: tuple[Any, ...]


def example_inputs(spec: CacheSpec, program: ProgramSpec, device: torch.device | str) -> tuple[Any, ...]:
    """Inputs that trace every path: two sequences (when the batch allows), in distinct slots."""
    phase = program.phase
    batch = program.static_batch or min(2, spec.max_batch_size)
    seq = 1 if phase is Phase.DECODE else min(4, spec.max_seq_len)
    positions = torch.full((batch,), 0 if phase is Phase.PREFILL else min(3, spec.max_seq_len - 1), dtype=torch.long)
    return (
        torch.zeros((batch, seq), dtype=torch.long, device=device),
        positions.to(device),
        torch.arange(batch, dtype=torch.long, device=device),
        torch.full((batch,), seq - 1, dtype=torch.long, device=device),
        spec.allocate(device),
    )


def dynamic_shapes(spec: CacheSpec, program: ProgramSpec) -> tuple[Any, ...]:
    Dim = torch.export.Dim
    dynamic_batch = program.static_batch is None and spec.max_batch_size > 1
    batch = Dim("batch", min=1, max=spec.max_batch_size) if dynamic_batch else None
    tokens: dict[int, Any] = {0: batch} if batch is not None else {}
    if program.phase is Phase.PREFILL:
        tokens[1] = Dim("seq", min=1, max=spec.max_seq_len)
    per_seq = {0: batch} if batch is not None else None
    return (tokens or None, per_seq, per_seq, per_seq, [None] * (2 * spec.num_layers))


def capture(hf_model: Any, spec: CacheSpec, program: ProgramSpec) -> CapturedProgram:
    """Export one program and return it unlifted: weights as attributes, inputs as tagged placeholders."""
    device = next(hf_model.parameters()).device
    inputs = example_inputs(spec, program, device)
    shapes = dynamic_shapes(spec, program)
    module = CaptureModule(hf_model, spec, program.phase)
    try:
        with torch.no_grad():
            exported = torch.export.export(module, inputs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # export raises many types; the user needs the architecture and the first line
        arch = type(hf_model).__name__
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"{arch} could not be captured with torch.export ({first}); supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        ) from exc
    gm = unlift(exported)
    _drop_inference_no_ops(gm)
    tag_inputs(gm, spec)
    return CapturedProgram(program, gm, inputs, shapes)


def tag_inputs(gm: torch.fx.GraphModule, spec: CacheSpec) -> None:
    """Record each placeholder's role in node.meta["oiv2"], which the passes read."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    expected = len(INPUT_NAMES) + 2 * spec.num_layers
    if len(placeholders) != expected:
        raise AssertionError(f"captured graph has {len(placeholders)} inputs, expected {expected}")
    for node, name in zip(placeholders, INPUT_NAMES, strict=False):
        node.meta["oiv2"] = {"role": name}
    for i, node in enumerate(placeholders[len(INPUT_NAMES) :]):
        node.meta["oiv2"] = {"role": "k_cache" if i % 2 == 0 else "v_cache", "layer": i // 2}


def _drop_inference_no_ops(gm: torch.fx.GraphModule) -> None:
    """Remove nodes that do nothing at inference but count as side effects, so they would keep dead
    subgraphs (such as HF's eager attention weights) alive: export's dtype/device asserts on .to()
    calls, which hold by construction here, and dropout in eval mode, which is the identity."""
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
        elif node.target is aten.dropout.default and (node.args[1] == 0.0 or not node.args[2]):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def export_transformed(program: CapturedProgram) -> torch.export.ExportedProgram:
    """Export the transformed graph again, as the program a backend lowers."""
    with torch.no_grad():
        return torch.export.export(
            program.graph_module, program.example_inputs, dynamic_shapes=program.dynamic_shapes, strict=False
        )
