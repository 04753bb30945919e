"""fuse_gated_act_into_gemv: the gated activation after a fused gate/up int8 decode product runs in
that product's epilogue.

Before (after fuse_norm_into_gemv; gate/up's product carries the norm before it):
    gu = oiv2.rms_norm_linear_int8_gemv(h, q, s, eps)                 # [1, 2I]
    a  = oiv2.gated_act(aten.reshape(gu, [..., 2I]), act)             # [..., I]
After:
    a  = aten.reshape(oiv2.rms_norm_linear_int8_gemv_gated_act(h, q, s, eps, index of act), [..., I])
One rewrite a layer of a gated MLP whose input norm runs in its product: the activation kernel goes,
with its launch gap and the [1, 2I] round trip through memory. The weights are the same tensors in
the same layout; prefill keeps its own product and activation.

Preconditions: the product's output is read by the reshape alone and the reshape by the activation
alone. Runs after fuse_norm_into_gemv on int8 builds (fold_norm_weights.applies), with
BuildConfig.fusion.enable_gated_act_into_linear (on by default; `build --no-fuse-gated-act-into-linear`
turns it off). H100, 32 llama-8b layers of int8 linears: 2681 us a step against 2702 with the
activation kernel (benchmarks/RESULTS.md). int4 has no such form: it was slower than the kernel.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.kernels.gated_act import ACTIVATIONS
from oiv2compile.passes.fold_norm_weights import applies
from oiv2compile.passes.fx_utils import aten, fake_value, is_call, record

log = logging.getLogger(__name__)

GATED_ACT = torch.ops.oiv2.gated_act.default
NORM_GEMV = torch.ops.oiv2.rms_norm_linear_int8_gemv.default
NORM_GEMV_ACT = torch.ops.oiv2.rms_norm_linear_int8_gemv_gated_act.default


def fuse_gated_act_into_gemv(gm: GraphModule, cfg: BuildConfig) -> int:
    if not (applies(cfg) and cfg.fusion.enable_gated_act_into_linear):
        return 0
    count = 0
    for act in gm.graph.find_nodes(op="call_function", target=GATED_ACT):
        product = _product_before(act)
        if product is not None:
            _rewrite(gm, act, product)
            count += 1
    log.debug("fuse_gated_act_into_gemv: %d gated activations run in the int8 products before them", count)
    return count


def _product_before(act: Node) -> Node | None:
    """The norm-and-product node whose output, reshaped, is all that the activation reads."""
    reshape = act.args[0]
    if not (isinstance(reshape, Node) and is_call(reshape, aten.reshape.default) and len(reshape.users) == 1):
        return None
    product = reshape.args[0]
    if not (isinstance(product, Node) and is_call(product, NORM_GEMV) and len(product.users) == 1):
        return None
    return product


def _rewrite(gm: GraphModule, act: Node, product: Node) -> None:
    activation = act.args[1]
    assert isinstance(activation, str)
    width = fake_value(act).shape[-1]
    with gm.graph.inserting_before(act):
        y = gm.graph.call_function(NORM_GEMV_ACT, (*product.args, ACTIVATIONS.index(activation)))
        y_val = fake_value(product)
        y.meta["val"] = y_val.new_empty((y_val.shape[0], width))
        out = gm.graph.call_function(aten.reshape.default, (y, list(fake_value(act).shape)))
        out.meta["val"] = fake_value(act)
    record(y, **product.meta.get("oiv2", {}), activation=activation)
    act.replace_all_uses_with(out)
