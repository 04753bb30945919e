"""fuse_norm_into_gemv: a residual add and an RMSNorm of unit weight between two quantized decode
products run inside them: the add in the first product's epilogue, the norm in the second's.

int8 (the GEMV takes one row; ones a tensor of ones):
    x = aten.reshape(oiv2.linear_int8_gemv(a, q1, s1), [..., K])        # o or down
    out, hidden = oiv2.add_rms_norm(x, residual, ones, eps)
    y = oiv2.linear_int8_gemv(aten.reshape(out, [1, K]), q2, s2)        # qkv or gate/up
  becomes
    h = oiv2.linear_int8_gemv_add(a, q1, s1, aten.reshape(residual, [1, K]))   # the new residual
    hidden = aten.reshape(h, [..., K])
    y = oiv2.rms_norm_linear_int8_gemv(h, q2, s2, eps)
int4 (the tensor-core op, where a decode program has 1 to 8 rows fixed):
    x = oiv2.linear_int4_mma(a, w1, sz1)
    out, hidden = oiv2.add_rms_norm(x, residual, ones, eps)
    y = oiv2.linear_int4_mma(out, w2, sz2)
  becomes
    hidden = oiv2.linear_int4_mma_add(a, w1, sz1, residual)
    y = oiv2.rms_norm_linear_int4_mma(hidden, w2, sz2, eps)
In a pre-norm decoder of L layers that is 2 * L - 1 rewrites: each layer's post-attention norm and
each later layer's input norm. The add + norm kernel between them goes, and its launch gap: the second
product is launched right after the first, which lets it start its weights' copies once the first has
issued its own (programmatic dependent launch, csrc/).

Why not the add in the second product: every warp of the int8 GEMV would read x and the residual,
which cost more than the norm kernel it saved (H100, 32 llama-8b layers: 2972 us a step against 2783
with the norm apart; benchmarks/RESULTS.md).

Preconditions: the norm's x is the first product's output (int8: reshaped) and nothing else reads it;
the norm's normalized output has no reader but the second product (int8: through a reshape); its
weight is all ones (fold_norm_weights made it so, or the model was built that way); int4: both
products have the same fixed rows, 1 to 8, and the residual the first product's shape. Skips anything
else, which keeps its kernels: the final norm (its output reaches the head through a slice), the first
layer's input norm, which fuse_norms leaves as it is, and every program of more rows (prefill).
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
from oiv2compile.passes.fx_utils import aten, attr_tensor, fake_value, fixed_rows, is_call, record

log = logging.getLogger(__name__)

GEMV = torch.ops.oiv2.linear_int8_gemv.default
MMA = torch.ops.oiv2.linear_int4_mma.default
# Each plain product's forms with the add and with the norm.
FORMS = {
    GEMV: (torch.ops.oiv2.linear_int8_gemv_add.default, torch.ops.oiv2.rms_norm_linear_int8_gemv.default),
    MMA: (torch.ops.oiv2.linear_int4_mma_add.default, torch.ops.oiv2.rms_norm_linear_int4_mma.default),
}
MMA_MAX_ROWS = 8  # the int4 epilogues run in the streamed kernel alone


def fuse_norm_into_gemv(gm: GraphModule, cfg: BuildConfig) -> int:
    if not applies(cfg):
        return 0
    count = 0
    for norm in gm.graph.find_nodes(op="call_function", target=ADD_RMS_NORM):
        products = _products_around(gm, norm)
        if products is not None:
            _rewrite(gm, norm, *products)
            count += 1
    log.debug("fuse_norm_into_gemv: %d adds and norms run in the quantized products around them", count)
    return count


def _products_around(gm: GraphModule, norm: Node) -> tuple[Node, Node, Node] | None:
    """(the product whose output the norm adds to the residual stream, that stream, the product of the
    same kind that alone reads the norm's output), where the norm's weight is all ones. The add's
    operands come in either order (HF's Llama writes residual + hidden_states)."""
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
        if is_call(x, MMA) and _mma_rows(x) is not None:
            first, stream = x, norm.args[1 - i]
            break
    if first is None or len(first.users) != 1 or not isinstance(stream, Node):
        return None
    outs = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outs) != 1 or len(outs[0].users) != 1:
        return None
    (reader,) = outs[0].users
    if first.target is MMA:  # the second product reads the norm's output as it is
        same = is_call(reader, MMA) and reader.args[0] is outs[0] and _mma_rows(reader) == _mma_rows(first)
        fits = fake_value(stream) is not None and fake_value(stream).shape == fake_value(first).shape
        return (first, stream, reader) if same and fits else None
    if not is_call(reader, aten.reshape.default) or len(reader.users) != 1:
        return None
    (second,) = reader.users
    return (first, stream, second) if is_call(second, GEMV) and second.args[0] is reader else None


def _mma_rows(node: Node) -> int | None:
    """The int4 product's rows where they are fixed and 1 to 8."""
    rows = fixed_rows(node)
    return rows if rows is not None and 1 <= rows <= MMA_MAX_ROWS else None


def _rewrite(gm: GraphModule, norm: Node, first: Node, residual: Node, second: Node) -> None:
    eps = norm.args[3]
    assert isinstance(eps, (int, float))
    with_add, with_norm = FORMS[first.target]  # type: ignore[index]
    hiddens = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 1]
    h_val = fake_value(first)  # int8: [1, K]; int4: the residual stream's shape
    with gm.graph.inserting_before(norm):
        if first.target is GEMV:
            res_row = gm.graph.call_function(aten.reshape.default, (residual, list(h_val.shape)))
            res_row.meta["val"] = fake_value(residual).reshape(h_val.shape)
        else:
            res_row = residual
        # The first product's weights are read before the norm already; the second's after it: again here.
        w2, s2 = (gm.graph.get_attr(str(w.target)) for w in second.args[1:3])  # type: ignore[union-attr]
        for new, old in zip((w2, s2), second.args[1:3], strict=True):
            new.meta.update(old.meta)  # type: ignore[union-attr]
        h = gm.graph.call_function(with_add, (*first.args, res_row))
        h.meta["val"] = h_val
        if first.target is GEMV:
            hidden = gm.graph.call_function(aten.reshape.default, (h, list(fake_value(residual).shape)))
            hidden.meta["val"] = fake_value(residual)
        else:
            hidden = h
        y = gm.graph.call_function(with_norm, (h, w2, s2, float(eps)))
        y.meta["val"] = fake_value(second)
    record(h, **first.meta.get("oiv2", {}))
    record(y, **second.meta.get("oiv2", {}), eps=float(eps))
    second.replace_all_uses_with(y)
    for old in hiddens:
        old.replace_all_uses_with(hidden)
