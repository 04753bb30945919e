"""fuse_norm_into_gemv: a residual add and an RMSNorm of unit weight before the int8 decode product
run in the product's kernel, as one oiv2::add_rms_norm_linear_int8_gemv.

Before (after fold_norm_weights, quantize_weights and use_cuda_kernels; ones a tensor of ones):
    out, hidden = oiv2.add_rms_norm(x, residual, ones, eps)
    y = oiv2.linear_int8_gemv(aten.reshape(out, [1, K]), qweight, scales)
After:
    y, h = oiv2.add_rms_norm_linear_int8_gemv(aten.reshape(x, [1, K]), aten.reshape(residual, [1, K]),
                                              qweight, scales, eps)
    hidden = aten.reshape(h, hidden's shape)
In a pre-norm decoder of L layers with the norm weights folded that is 2 * L rewrites (each layer's
qkv and gate/up products; the final norm too where the output head is quantized and not tied).

Preconditions: the norm's normalized output has no reader but the reshape into the product; its
weight is all ones (fold_norm_weights made it so, or the model was built that way). Skips anything
else, which keeps the two kernels.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.passes.fold_norm_weights import ADD_RMS_NORM, applies
from oiv2compile.passes.fx_utils import aten, attr_tensor, fake_value, is_call, record

log = logging.getLogger(__name__)

GEMV = torch.ops.oiv2.linear_int8_gemv.default
FUSED = torch.ops.oiv2.add_rms_norm_linear_int8_gemv.default


def fuse_norm_into_gemv(gm: GraphModule, cfg: BuildConfig) -> int:
    if not applies(cfg):
        return 0
    count = 0
    for norm in gm.graph.find_nodes(op="call_function", target=ADD_RMS_NORM):
        gemv = _gemv_after(gm, norm)
        if gemv is not None:
            _rewrite(gm, norm, gemv)
            count += 1
    log.debug("fuse_norm_into_gemv: %d norms run in the int8 product after them", count)
    return count


def _gemv_after(gm: GraphModule, norm: Node) -> Node | None:
    """The int8 GEMV that alone reads the norm's output, where the norm's weight is all ones."""
    weight = attr_tensor(gm, norm.args[2])
    if weight is None or not bool((weight == 1).all()):
        return None
    outs = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outs) != 1 or len(outs[0].users) != 1:
        return None
    (row,) = outs[0].users
    if not is_call(row, aten.reshape.default) or len(row.users) != 1:
        return None
    (gemv,) = row.users
    return gemv if is_call(gemv, GEMV) and gemv.args[0] is row else None


def _rewrite(gm: GraphModule, norm: Node, gemv: Node) -> None:
    x, residual, eps = norm.args[0], norm.args[1], norm.args[3]
    qweight, scales = gemv.args[1], gemv.args[2]
    assert isinstance(qweight, Node) and isinstance(scales, Node) and isinstance(eps, (int, float))
    hiddens = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 1]
    row_val, y_val = fake_value(gemv.args[0]), fake_value(gemv)
    k = row_val.shape[-1]
    with gm.graph.inserting_before(norm):  # before every reader of hidden; the weights read again here
        weights = [gm.graph.get_attr(str(w.target)) for w in (qweight, scales)]
        for new, old in zip(weights, (qweight, scales), strict=True):
            new.meta.update(old.meta)
        rows = []
        for t in (x, residual):
            rows.append(gm.graph.call_function(aten.reshape.default, (t, [1, k])))
            rows[-1].meta["val"] = fake_value(t).reshape(1, k)
        fused = gm.graph.call_function(FUSED, (*rows, *weights, eps))
        y = gm.graph.call_function(operator.getitem, (fused, 0))  # [1, N]
        h = gm.graph.call_function(operator.getitem, (fused, 1))  # [1, K]
        y.meta["val"], h.meta["val"] = y_val, rows[0].meta["val"]
        fused.meta["val"] = (y_val, h.meta["val"])
        hidden = gm.graph.call_function(aten.reshape.default, (h, list(fake_value(x).shape)))
        hidden.meta["val"] = fake_value(x)
    record(fused, **gemv.meta.get("oiv2", {}), eps=float(eps))
    gemv.replace_all_uses_with(y)
    for old in hiddens:
        old.replace_all_uses_with(hidden)
