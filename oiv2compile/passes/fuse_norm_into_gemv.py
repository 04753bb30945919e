"""fuse_norm_into_gemv: a residual add and an RMSNorm of unit weight between two int8 decode products
run inside them: the add in the first product's epilogue, the norm in the second's.

Before (after fold_norm_weights, quantize_weights and use_cuda_kernels; ones a tensor of ones):
    x = aten.reshape(oiv2.linear_int8_gemv(a, q1, s1), [..., K])        # o or down
    out, hidden = oiv2.add_rms_norm(x, residual, ones, eps)
    y = oiv2.linear_int8_gemv(aten.reshape(out, [1, K]), q2, s2)        # qkv or gate/up
After:
    h = oiv2.linear_int8_gemv_add(a, q1, s1, aten.reshape(residual, [1, K]))   # the new residual
    hidden = aten.reshape(h, [..., K])
    y = oiv2.rms_norm_linear_int8_gemv(h, q2, s2, eps)
In a pre-norm decoder of L layers that is 2 * L - 1 rewrites: each layer's post-attention norm and
each later layer's input norm. The add + norm kernel between them goes, and its launch gap.

Why not the add in the second product: every warp of that GEMV would read x and the residual, which
cost more than the norm kernel it saved (H100, 32 llama-8b layers: 2972 us a step against 2783 with
the norm apart; benchmarks/RESULTS.md).

Preconditions: the norm's x is the first product's output (reshaped) and nothing else reads it; the
norm's normalized output has no reader but the reshape into the second product; its weight is all
ones (fold_norm_weights made it so, or the model was built that way). Skips anything else, which keeps
its kernels: the final norm (its output reaches the head through a slice), and the first layer's
input norm, which fuse_norms leaves as it is.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.passes.fold_norm_weights import ADD_RMS_NORM, applies
from oiv2compile.passes.fx_utils import aten, attr_tensor, fake_value, is_call, record

log = logging.getLogger(__name__)

GEMV = torch.ops.oiv2.linear_int8_gemv.default
GEMV_ADD = torch.ops.oiv2.linear_int8_gemv_add.default
NORM_GEMV = torch.ops.oiv2.rms_norm_linear_int8_gemv.default


def fuse_norm_into_gemv(gm: GraphModule, cfg: BuildConfig) -> int:
    if not applies(cfg):
        return 0
    count = 0
    for norm in gm.graph.find_nodes(op="call_function", target=ADD_RMS_NORM):
        products = _products_around(gm, norm)
        if products is not None:
            _rewrite(gm, norm, *products)
            count += 1
    log.debug("fuse_norm_into_gemv: %d adds and norms run in the int8 products around them", count)
    return count


def _products_around(gm: GraphModule, norm: Node) -> tuple[Node, Node, Node] | None:
    """(the GEMV whose output the norm adds to the residual stream, that stream, the GEMV that alone
    reads the norm's output), where the norm's weight is all ones. The add's operands come in either
    order (HF's Llama writes residual + hidden_states)."""
    weight = attr_tensor(gm, norm.args[2])
    if weight is None or not bool((weight == 1).all()):
        return None
    first: Any = None
    stream: Any = None
    for i in (0, 1):
        x: Any = norm.args[i]
        if is_call(x, aten.reshape.default) and len(x.users) == 1 and is_call(x.args[0], GEMV):
            first, stream = x.args[0], norm.args[1 - i]
            break
    if first is None or len(first.users) != 1 or not isinstance(stream, Node):
        return None
    outs = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outs) != 1 or len(outs[0].users) != 1:
        return None
    (row,) = outs[0].users
    if not is_call(row, aten.reshape.default) or len(row.users) != 1:
        return None
    (second,) = row.users
    return (first, stream, second) if is_call(second, GEMV) and second.args[0] is row else None


def _rewrite(gm: GraphModule, norm: Node, first: Node, residual: Node, second: Node) -> None:
    eps = norm.args[3]
    assert isinstance(eps, (int, float))
    hiddens = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 1]
    h_val = fake_value(first)  # [1, K]
    with gm.graph.inserting_before(norm):
        res_row = gm.graph.call_function(aten.reshape.default, (residual, list(h_val.shape)))
        res_row.meta["val"] = fake_value(residual).reshape(h_val.shape)
        # The first product's weights are read before the norm already; the second's after it: again here.
        q2, s2 = (gm.graph.get_attr(str(w.target)) for w in second.args[1:3])  # type: ignore[union-attr]
        for new, old in zip((q2, s2), second.args[1:3], strict=True):
            new.meta.update(old.meta)  # type: ignore[union-attr]
        h = gm.graph.call_function(GEMV_ADD, (*first.args, res_row))
        h.meta["val"] = h_val
        hidden = gm.graph.call_function(aten.reshape.default, (h, list(fake_value(residual).shape)))
        hidden.meta["val"] = fake_value(residual)
        y = gm.graph.call_function(NORM_GEMV, (h, q2, s2, float(eps)))
        y.meta["val"] = fake_value(second)
    record(h, **first.meta.get("oiv2", {}))
    record(y, **second.meta.get("oiv2", {}), eps=float(eps))
    second.replace_all_uses_with(y)
    for old in hiddens:
        old.replace_all_uses_with(hidden)
