"""fuse_gated_act_into_gemv: the gated activation after a fused gate/up decode product runs in that
product's epilogue (int8, and int4 with the weight's rows interleaved).

int8, before (after fuse_norm_into_gemv; gate/up's product carries the norm before it):
    gu = oiv2.rms_norm_linear_int8_gemv(h, q, s, eps)                 # [1, 2I]
    a  = oiv2.gated_act(aten.reshape(gu, [..., 2I]), act)             # [..., I]
After:
    a  = aten.reshape(oiv2.rms_norm_linear_int8_gemv_gated_act(h, q, s, eps, index of act), [..., I])
The weights are the same tensors in the same layout; prefill keeps its own product and activation.

int4: the kernel needs the gate and up rows of an output in the same block of 16 rows, so every
program's gate/up weight is replaced by the same weight with its rows interleaved by 8
(kernels/rms_norm_linear_int4_mma_gated_act.py; one copy, shared by the programs). Where the product
carries the norm (a decode program of 1 to 8 rows):
    a = oiv2.gated_act(oiv2.rms_norm_linear_int4_mma(h, w, sz, eps), act)
  becomes
    a = oiv2.rms_norm_linear_int4_mma_gated_act(h, w_interleaved, sz_interleaved, eps, index of act)
and elsewhere (prefill, larger batches) the plain product reads the interleaved weight and its output is
put back in gate-then-up order before the activation kernel (a copy of [rows, 2I]):
    a = oiv2.gated_act(flatten(transpose(unflatten(oiv2.linear_int4_mma(x, w_interleaved, sz_interleaved)))), act)

One rewrite a layer of a gated MLP: in the decode products the activation kernel goes, with its launch
gap and the [rows, 2I] round trip through memory.

Preconditions: the product's output is read by the activation alone (int8: through a reshape read by it
alone); int4: the product's weight tensors are read by it alone. Runs after fuse_norm_into_gemv on int8
and int4 builds (fold_norm_weights.applies), with BuildConfig.fusion.enable_gated_act_into_linear (on by
default; `build --no-fuse-gated-act-into-linear` turns it off). H100, 32 llama-8b layers of int8
linears: 2681 us a step against 2702 with the activation kernel; H200, 32 llama-8b layers of int4
products: 1469-1487 us against 1504-1510 (benchmarks/RESULTS.md, 512b446). An earlier int4 form (whole
pairs of gate and up blocks a CTA) was slower than the kernel.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.kernels.gated_act import ACTIVATIONS
from oiv2compile.kernels.rms_norm_linear_int4_mma_gated_act import HALF, INTERLEAVED, interleave_gate_up
from oiv2compile.passes.fold_norm_weights import applies
from oiv2compile.passes.fx_utils import aten, attr_tensors, derived_weights, drop_attr, fake_value, is_call, record

log = logging.getLogger(__name__)

GATED_ACT = torch.ops.oiv2.gated_act.default
NORM_GEMV = torch.ops.oiv2.rms_norm_linear_int8_gemv.default
NORM_GEMV_ACT = torch.ops.oiv2.rms_norm_linear_int8_gemv_gated_act.default
MMA = torch.ops.oiv2.linear_int4_mma.default
NORM_MMA = torch.ops.oiv2.rms_norm_linear_int4_mma.default
NORM_MMA_ACT = torch.ops.oiv2.rms_norm_linear_int4_mma_gated_act.default


def fuse_gated_act_into_gemv(gm: GraphModule, cfg: BuildConfig) -> int:
    if not (applies(cfg) and cfg.fusion.enable_gated_act_into_linear):
        return 0
    count = 0
    for act in gm.graph.find_nodes(op="call_function", target=GATED_ACT):
        product = _product_before(act)
        if product is not None:
            _rewrite(gm, act, product)
            count += 1
            continue
        product = _int4_product_before(gm, act)
        if product is not None:
            in_epilogue = is_call(product, NORM_MMA)  # the decode product; elsewhere only the weight changes
            _rewrite_int4(gm, act, product)
            count += in_epilogue
    log.debug("fuse_gated_act_into_gemv: %d gated activations run in the products before them", count)
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


def _int4_product_before(gm: GraphModule, act: Node) -> Node | None:
    """The int4 gate/up product (with the norm or plain) that the activation alone reads, whose weight
    tensors it alone reads."""
    product = act.args[0]
    if not (isinstance(product, Node) and is_call(product, MMA, NORM_MMA) and len(product.users) == 1):
        return None
    weights = product.args[1:3]
    if attr_tensors(gm, list(weights)) is None or any(len(w.users) != 1 for w in weights):  # type: ignore[union-attr]
        return None
    return product


def _rewrite_int4(gm: GraphModule, act: Node, product: Node) -> None:
    packed, pairs = product.args[1:3]
    assert isinstance(packed, Node) and isinstance(pairs, Node)

    def interleaved() -> dict[str, torch.Tensor]:
        tensors = attr_tensors(gm, [packed, pairs])
        assert tensors is not None
        w, sz = interleave_gate_up(*tensors)
        return {"interleaved": w, "interleaved_scale_zero": sz}

    with gm.graph.inserting_before(product):
        w_node, sz_node = derived_weights(gm, packed, ("interleaved", "interleaved_scale_zero"), interleaved)
    activation = act.args[1]
    assert isinstance(activation, str)
    if is_call(product, NORM_MMA):  # the decode program's product: the activation goes into its epilogue
        x, _, _, eps = product.args
        with gm.graph.inserting_before(act):
            y = gm.graph.call_function(NORM_MMA_ACT, (x, w_node, sz_node, eps, ACTIVATIONS.index(activation)))
        y.meta["val"] = fake_value(act)
        record(y, **product.meta.get("oiv2", {}), activation=activation, gate_up_rows=INTERLEAVED)
        act.replace_all_uses_with(y)
        gm.graph.erase_node(act)
        gm.graph.erase_node(product)
        _drop_first_order(gm, packed, pairs)
        return
    # Elsewhere the product reads the interleaved rows too, and its output goes back to gate-then-up order.
    product.args = (product.args[0], w_node, sz_node)
    record(product, gate_up_rows=INTERLEAVED)
    value = fake_value(product)
    width = value.shape[-1]
    with gm.graph.inserting_before(act):
        blocks = gm.graph.call_function(aten.unflatten.int, (product, -1, [width // (2 * HALF), 2, HALF]))
        blocks.meta["val"] = value.unflatten(-1, (width // (2 * HALF), 2, HALF))
        halves = gm.graph.call_function(aten.transpose.int, (blocks, -3, -2))
        halves.meta["val"] = blocks.meta["val"].transpose(-3, -2)
        ordered = gm.graph.call_function(aten.flatten.using_ints, (halves, -3, -1))
        ordered.meta["val"] = halves.meta["val"].flatten(-3, -1)
    act.replace_input_with(product, ordered)
    _drop_first_order(gm, packed, pairs)


def _drop_first_order(gm: GraphModule, packed: Node, pairs: Node) -> None:
    """The weight in gate-then-up order, read no more: the artifact saves every attribute it finds."""
    drop_attr(gm, packed)
    drop_attr(gm, pairs)
