"""fuse_ffn: the gate and up projections of a gated MLP become one linear and one oiv2::gated_act.

Before (Llama, Mistral, Qwen2 MLP; act is SiLU or GELU as the model's hidden_act says):
    g   = aten.linear(x, W_gate[, b_gate])                       # [..., I]
    u   = aten.linear(x, W_up[, b_up])                           # [..., I]
    h   = aten.mul(act(g), u)                                    # [..., I]
After:
    gu  = aten.linear(x, W_gate_up[, b_gate_up])                 # [..., 2I], W_gate_up = cat(W_gate, W_up)
    h   = oiv2.gated_act(gu, "silu" | "gelu" | "gelu_tanh")      # [..., I]
W_gate_up is concatenated once, at build time, and registered next to the originals as
`<mlp>.gate_up_proj.weight` (and `.bias`), a name under the decoder layer, so quantize_weights (which
runs after) quantizes it like any other linear of the layer. The originals go when nothing else reads
them. The fused linear records `parts` (the original weights' storage and rows) so that verification
can hand each HF linear its share of a quantized fused weight.

Preconditions: both weights are 2-D floating attributes of one module's children with the same shape
and dtype; both linears have a bias or neither does; the activation is aten.silu or aten.gelu (erf or
tanh). Skips anything else, such as a non-gated MLP (act(up(x)) with no product), and a gate or up
projection that something else also reads.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
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


def _silu(x, w_gate, w_up):  # type: ignore[no-untyped-def]
    return aten.mul.Tensor(aten.silu.default(aten.linear.default(x, w_gate)), aten.linear.default(x, w_up))


def _gelu(x, w_gate, w_up, approximate):  # type: ignore[no-untyped-def]
    gate = aten.gelu.default(aten.linear.default(x, w_gate), approximate=approximate)
    return aten.mul.Tensor(gate, aten.linear.default(x, w_up))


def _silu_bias(x, w_gate, w_up, b_gate, b_up):  # type: ignore[no-untyped-def]
    gate = aten.silu.default(aten.linear.default(x, w_gate, b_gate))
    return aten.mul.Tensor(gate, aten.linear.default(x, w_up, b_up))


def _gelu_bias(x, w_gate, w_up, b_gate, b_up, approximate):  # type: ignore[no-untyped-def]
    gate = aten.gelu.default(aten.linear.default(x, w_gate, b_gate), approximate=approximate)
    return aten.mul.Tensor(gate, aten.linear.default(x, w_up, b_up))


_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}  # aten.gelu's `approximate` -> gated_act's name


def fuse_ffn(gm: GraphModule, cfg: BuildConfig) -> int:
    count = 0
    for pattern in (_silu, _gelu, _silu_bias, _gelu_bias):
        for match in find_pattern(gm, pattern, lambda m: _fits(gm, m)):
            _rewrite(gm, match)
            count += 1
    log.debug("fuse_ffn: %d gated MLPs fused", count)
    return count


def _weights(match: Match) -> tuple[list[Node], list[Node]]:
    args = match.args
    biases = [args["b_gate"], args["b_up"]] if "b_gate" in args else []
    return [args["w_gate"], args["w_up"]], biases


def _activation(match: Match) -> str | None:
    return "silu" if "approximate" not in match.args else _ACTIVATION.get(match.args["approximate"])


def _fits(gm: GraphModule, match: Match) -> bool:
    weights, biases = _weights(match)
    tensors = attr_tensors(gm, weights)
    return (
        _activation(match) is not None
        and common_parent(weights) is not None
        and tensors is not None
        and same_2d_floats(tensors)
        and tensors[0].shape == tensors[1].shape
        and attr_tensors(gm, biases) is not None
    )


def _rewrite(gm: GraphModule, match: Match) -> None:
    weights, biases = _weights(match)
    tensors, bias_tensors, parent = attr_tensors(gm, weights), attr_tensors(gm, biases), common_parent(weights)
    assert tensors is not None and bias_tensors is not None and parent is not None  # _fits checked them
    (product,) = match.outputs
    act, up = (cast(Node, a) for a in product.args[:2])
    gate = cast(Node, act.args[0])
    x = gate.args[0]  # read now: an earlier rewrite may have replaced the matched input
    with gm.graph.inserting_before(product):
        w = add_weight(gm, join_target(parent, "gate_up_proj.weight"), torch.cat(tensors), like=weights[0])  # [2I, H]
        b = None
        if biases:
            b = add_weight(gm, join_target(parent, "gate_up_proj.bias"), torch.cat(bias_tensors), like=biases[0])
        linear = gm.graph.call_function(aten.linear.default, (x, w, b) if b is not None else (x, w))  # [..., 2I]
        out = gm.graph.call_function(torch.ops.oiv2.gated_act.default, (linear, _activation(match)))  # [..., I]
    vals: list[Any] = [gate.meta.get("val"), up.meta.get("val")]
    linear.meta["val"] = torch.cat(vals, dim=-1) if None not in vals else None
    out.meta["val"] = product.meta.get("val")
    # verify.py hands each HF linear its rows of the fused weight, found by the original's storage.
    record(linear, parts=[(t.data_ptr(), t.shape[0]) for t in tensors])
    record(out, activation=_activation(match))
    product.replace_all_uses_with(out)
    for node in (product, act, gate, up):
        gm.graph.erase_node(node)
    for node in weights + biases:
        drop_attr(gm, node)
