"""fuse_norms: a residual add and the RMSNorm after it become one oiv2::add_rms_norm.

Before (Hugging Face's Llama, Mistral and Qwen2 RMSNorm as export records it; in float32 models the
upcast is a no-op that export still records, and later residual adds read it instead of the add):
    hidden = aten.add(x, residual)                               # [..., N], the new residual stream
    h      = aten.to(hidden, float32)
    out    = aten.mul(w, aten.to(h * aten.rsqrt(aten.mean(aten.pow(h, 2), [-1], True) + eps), dtype))
After:
    out, hidden = oiv2.add_rms_norm(x, residual, w, eps)         # both [..., N]
Every later reader of `hidden` (or of `h`, which in float32 is the same values) reads the op's second
output. In a pre-norm decoder of L layers that is 2 * L rewrites: each layer's post-attention norm,
each later layer's input norm and the final norm; the first layer's input norm reads the embeddings
with no add before it and stays as it is.

Preconditions: x, residual and the normalized output share one shape and dtype (`dtype` is the input
dtype, as HF's `.to(input_dtype)` makes it); w is 1-D over the last dimension in that dtype; eps is a
number; the float32 upcast feeds nothing else unless the model is float32. Skips a norm without an
add before it, LayerNorm, and a norm whose inner values something else reads.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.passes.fx_utils import Match, aten, fake_value, find_pattern, record

log = logging.getLogger(__name__)


def _add_rms_norm(x, residual, weight, eps, dtype):  # type: ignore[no-untyped-def]
    hidden = aten.add.Tensor(x, residual)
    h = aten.to.dtype(hidden, torch.float32)
    variance = aten.mean.dim(aten.pow.Tensor_Scalar(h, 2), [-1], True)
    normed = aten.mul.Tensor(h, aten.rsqrt.default(aten.add.Tensor(variance, eps)))
    return aten.mul.Tensor(weight, aten.to.dtype(normed, dtype)), hidden, h


def fuse_norms(gm: GraphModule, cfg: BuildConfig) -> int:
    count = 0
    for match in find_pattern(gm, _add_rms_norm, _fits):
        _rewrite(gm, match)
        count += 1
    log.debug("fuse_norms: %d residual adds and RMSNorms fused", count)
    return count


def _fits(match: Match) -> bool:
    out, _, h = match.outputs
    weight, eps, dtype = match.args["weight"], match.args["eps"], match.args["dtype"]
    vx, vr, vw, vout = (fake_value(n) for n in (match.args["x"], match.args["residual"], weight, out))
    if any(v is None for v in (vx, vr, vw, vout)) or not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return False
    if not (vx.shape == vr.shape == vout.shape and vx.dtype == vr.dtype == vout.dtype == vw.dtype == dtype):
        return False
    if vw.dim() != 1 or vw.shape[0] != vx.shape[-1]:
        return False
    # In float32 the upcast is the residual itself; in a lower precision its readers want float32 values.
    return dtype == torch.float32 or all(user in match.nodes for user in h.users)


def _rewrite(gm: GraphModule, match: Match) -> None:
    out, hidden, h = match.outputs
    x, residual = hidden.args[:2]  # read now: an earlier rewrite may have replaced the matched operands
    with gm.graph.inserting_before(hidden):
        fused = gm.graph.call_function(
            torch.ops.oiv2.add_rms_norm.default, (x, residual, match.args["weight"], float(match.args["eps"]))
        )
        normed = gm.graph.call_function(operator.getitem, (fused, 0))  # [..., N]
        new_hidden = gm.graph.call_function(operator.getitem, (fused, 1))  # [..., N]
    fused.meta["val"] = (out.meta.get("val"), hidden.meta.get("val"))
    normed.meta["val"], new_hidden.meta["val"] = fused.meta["val"]
    record(fused, eps=float(match.args["eps"]))
    out.replace_all_uses_with(normed)
    h.replace_all_uses_with(new_hidden)
    hidden.replace_all_uses_with(new_hidden)
