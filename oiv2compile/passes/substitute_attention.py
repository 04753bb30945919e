"""substitute_attention: HF's attention over whole cache rows becomes oiv2::attention over the filled part.

Before, sdpa form (HF's default; k and v go through repeat_kv when the model uses GQA):
    k   = index(k_cache, [slots]) [-> unsqueeze -> expand -> reshape]
    v   = index(v_cache, [slots]) [-> ...]
    out = aten.scaled_dot_product_attention(q, k, v, mask, scale=s)
Before, eager form (attn_implementation="eager"):
    w   = matmul(q, transpose(k, 2, 3)) * s        # or / (1 / s)
    p   = softmax(w + mask, -1, float32).to(q.dtype) [-> dropout(p=0)]
    out = matmul(p, v)
After:
    out = oiv2.attention(q, k_cache, v_cache, slots, positions, s)     # [B, Hq, S, D]

Preconditions: k and v trace back through view-like ops to index(cache, [slots]) of the k and v cache
of one layer (rewrite_kv_cache runs first, so the caches are the placeholders themselves); the mask
is computed from the positions (and the token shape) alone, which is the causal mask capture builds;
no dropout, no is_causal flag; q has a multiple of the kv heads. Skips attention that does not fit,
such as attention with soft-capping or a learned bias: the build's count check then fails loudly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.passes.fx_utils import (
    aten,
    call_args,
    depends_only_on,
    fake_value,
    inputs_by_role,
    is_call,
    record,
    role,
    strip_views,
)

_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.dropout.default)


def substitute_attention(gm: GraphModule, cfg: BuildConfig) -> int:
    inputs = inputs_by_role(gm)
    if "slots" not in inputs or "positions" not in inputs:
        return 0
    mask_sources = [inputs["positions"]] + ([inputs["input_ids"]] if "input_ids" in inputs else [])
    count = 0
    for node in list(gm.graph.nodes):
        match = _match_sdpa(node) if is_call(node, aten.scaled_dot_product_attention.default) else None
        if match is None and is_call(node, aten.matmul.default):
            match = _match_eager(node)
        if match is None:
            continue
        q, k_cache, v_cache, mask, scale = match
        if not _caches_of_one_layer(k_cache, v_cache) or not depends_only_on(mask, mask_sources):
            continue
        q_val, cache_val = fake_value(q), fake_value(k_cache)
        if q_val is None or cache_val is None or q_val.shape[1] % cache_val.shape[1] != 0:
            continue
        if scale is None:
            scale = 1.0 / math.sqrt(q_val.shape[-1])
        with gm.graph.inserting_before(node):
            attn = gm.graph.call_function(
                torch.ops.oiv2.attention.default,
                (q, k_cache, v_cache, inputs["slots"], inputs["positions"], float(scale)),
            )
        attn.meta["val"] = node.meta.get("val")
        record(
            attn,
            layer=k_cache.meta["oiv2"]["layer"],
            form="sdpa" if is_call(node, aten.scaled_dot_product_attention.default) else "eager",
        )
        node.replace_all_uses_with(attn)
        gm.graph.erase_node(node)
        count += 1
    return count


def _cache_read(node: Any) -> Node | None:
    """The cache placeholder behind `index(cache, [slots])`, seen through view-like ops."""
    source = strip_views(node)
    if not is_call(source, aten.index.Tensor):
        return None
    cache, indices = source.args[:2]
    if role(cache) not in ("k_cache", "v_cache") or len(indices) != 1 or role(indices[0]) != "slots":
        return None
    return cache


def _match_sdpa(node: Node) -> tuple[Any, Node, Node, Any, float | None] | None:
    args = call_args(node)
    if args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False) or args.get("attn_mask") is None:
        return None
    k_cache, v_cache = _cache_read(args["key"]), _cache_read(args["value"])
    if k_cache is None or v_cache is None:
        return None
    return args["query"], k_cache, v_cache, args["attn_mask"], args.get("scale")


def _match_eager(node: Node) -> tuple[Any, Node, Node, Any, float | None] | None:
    probs, value = node.args[:2]
    v_cache = _cache_read(value)
    if v_cache is None:
        return None
    probs = _strip_casts(probs)
    if not is_call(probs, *_SOFTMAX) or probs.args[1] not in (-1, 3):
        return None
    masked = probs.args[0]
    if not is_call(masked, aten.add.Tensor):
        return None
    scores, mask = masked.args[:2]
    scale: float | None = None
    if is_call(scores, aten.mul.Tensor) and isinstance(scores.args[1], (int, float)):
        scores, scale = scores.args[0], float(scores.args[1])
    elif is_call(scores, aten.div.Tensor) and isinstance(scores.args[1], (int, float)):
        scores, scale = scores.args[0], 1.0 / float(scores.args[1])
    if not is_call(scores, aten.matmul.default) or scale is None:
        return None
    query, key_t = scores.args[:2]
    if not is_call(key_t, aten.transpose.int) or sorted(d % 4 for d in key_t.args[1:3]) != [2, 3]:
        return None
    k_cache = _cache_read(key_t.args[0])
    if k_cache is None:
        return None
    return query, k_cache, v_cache, mask, scale


def _strip_casts(node: Any) -> Any:
    while is_call(node, *_CASTS):
        if is_call(node, aten.dropout.default) and node.args[1] != 0.0 and node.args[2]:
            return None
        node = node.args[0]
    return node


def _caches_of_one_layer(k_cache: Node, v_cache: Node) -> bool:
    k, v = k_cache.meta["oiv2"], v_cache.meta["oiv2"]
    return k["role"] == "k_cache" and v["role"] == "v_cache" and k["layer"] == v["layer"]
