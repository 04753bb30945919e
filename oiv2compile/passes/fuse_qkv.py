"""fuse_qkv: the q, k and v projections of an attention layer become one linear and a split.

Before (biases optional, all three or none; Qwen2 has them):
    q = aten.linear(x, W_q[, b_q])                               # [..., Hq * D]
    k = aten.linear(x, W_k[, b_k])                               # [..., Hkv * D]
    v = aten.linear(x, W_v[, b_v])                               # [..., Hkv * D]
After:
    qkv     = aten.linear(x, W_qkv[, b_qkv])                     # [..., (Hq + 2 Hkv) * D], W_qkv = cat(W_q, W_k, W_v)
    q, k, v = aten.split_with_sizes(qkv, [Hq * D, Hkv * D, Hkv * D], -1)
W_qkv is concatenated once, at build time, and registered as `<attn>.qkv_proj.weight` (and `.bias`)
under the decoder layer, so quantize_weights (which runs after) quantizes it; the originals go when
nothing else reads them. The fused linear records `parts` (the original weights' storage and rows) for
verification. The three outputs are views of one buffer; the reshapes after them only split the last
dimension, which a view of a column slice allows.

Preconditions: three linears read the same input, their weights are 2-D floating attributes of one
module's children with the same input features and dtype, and all three have a bias or none does.
Any three such linears are fused (the split gives each consumer exactly what its linear gave it), in
graph order; a layer with fewer than three (an MLP's two, the output head) is left alone.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile.config import BuildConfig
from oiv2compile.passes.fx_utils import (
    Match,
    add_weight,
    aten,
    attr_tensors,
    common_parent,
    drop_attr,
    find_pattern,
    join_target,
    record,
    same_2d_floats,
)

log = logging.getLogger(__name__)


def _qkv(x, w_q, w_k, w_v):  # type: ignore[no-untyped-def]
    return aten.linear.default(x, w_q), aten.linear.default(x, w_k), aten.linear.default(x, w_v)


def _qkv_bias(x, w_q, w_k, w_v, b_q, b_k, b_v):  # type: ignore[no-untyped-def]
    return aten.linear.default(x, w_q, b_q), aten.linear.default(x, w_k, b_k), aten.linear.default(x, w_v, b_v)


def fuse_qkv(gm: GraphModule, cfg: BuildConfig) -> int:
    count = 0
    for pattern in (_qkv, _qkv_bias):
        for match in find_pattern(gm, pattern, lambda m: _fits(gm, m)):
            _rewrite(gm, match)
            count += 1
    log.debug("fuse_qkv: %d attention projections fused", count)
    return count


def _weights(match: Match) -> tuple[list[Node], list[Node]]:
    args = match.args
    biases = [args["b_q"], args["b_k"], args["b_v"]] if "b_q" in args else []
    return [args["w_q"], args["w_k"], args["w_v"]], biases


def _fits(gm: GraphModule, match: Match) -> bool:
    weights, biases = _weights(match)
    return (
        common_parent(weights) is not None
        and same_2d_floats(attr_tensors(gm, weights))
        and attr_tensors(gm, biases) is not None
    )


def _rewrite(gm: GraphModule, match: Match) -> None:
    weights, biases = _weights(match)
    tensors, bias_tensors, parent = attr_tensors(gm, weights), attr_tensors(gm, biases), common_parent(weights)
    assert tensors is not None and bias_tensors is not None and parent is not None  # _fits checked them
    linears = match.outputs  # q, k, v
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first = min(linears, key=order.__getitem__)
    x = linears[0].args[0]  # read now: an earlier rewrite may have replaced the matched input
    sizes = [t.shape[0] for t in tensors]
    with gm.graph.inserting_before(first):
        w = add_weight(gm, join_target(parent, "qkv_proj.weight"), torch.cat(tensors), like=weights[0])
        b = None
        if biases:
            b = add_weight(gm, join_target(parent, "qkv_proj.bias"), torch.cat(bias_tensors), like=biases[0])
        fused = gm.graph.call_function(aten.linear.default, (x, w, b) if b is not None else (x, w))  # [..., sum(sizes)]
        split = gm.graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        outs = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(3)]  # q, k, v
    vals: list[Any] = [n.meta.get("val") for n in linears]
    known = None not in vals
    fused.meta["val"] = torch.cat(vals, dim=-1) if known else None
    split.meta["val"] = vals if known else None
    for out, val in zip(outs, vals, strict=True):
        out.meta["val"] = val
    # verify.py hands each HF linear its rows of the fused weight, found by the original's storage.
    record(fused, parts=[(t.data_ptr(), t.shape[0]) for t in tensors])
    for linear, out in zip(linears, outs, strict=True):
        linear.replace_all_uses_with(out)
        gm.graph.erase_node(linear)
    for node in weights + biases:
        drop_attr(gm, node)
