"""fold_norm_weights: an RMSNorm's weight moves into the weights of the linears that read its output,
so that the int8 and int4 decode products can run the norm themselves (fuse_norm_into_gemv).

Before (after fuse_norms, W a floating attribute that only this linear reads, g the norm's weight):
    out, hidden = oiv2.add_rms_norm(x, residual, g, eps)
    y = aten.linear(out, W, bias)                                 # every reader of out is a linear
After:
    out, hidden = oiv2.add_rms_norm(x, residual, g_unit, eps)     # g_unit: ones
    y = aten.linear(out, W_norm_folded, bias)                     # W_norm_folded = W * diag(g)
The product is the same up to rounding: g multiplies the features of out, so it can multiply W's
columns instead. quantize_weights then quantizes W_norm_folded, and the decode program's norm has a
unit weight, which fuse_norm_into_gemv needs. Each linear records the storage of the weight it stood
for and g, so that the check against Hugging Face (verify.py) gives the HF linear the weight the
quantized layout stands for divided by g.

Preconditions: int8 or int4 quantization with the CUDA kernels on a CUDA build through Inductor (where
the fused kernels exist); g is 1-D and nonzero, W [N, len(g)] in g's dtype; W is read by this linear
alone and is not tied to another attribute (an output head tied to the embedding table keeps its
weight); the linear is one quantize_weights quantizes. Skips a norm whose weight is already all ones
(a model as initialized), and a norm any of whose readers is not such a linear: the final norm, whose
output reaches the head through a slice (the last position), keeps its weight and its kernel.
"""

from __future__ import annotations

import logging
import operator
from functools import partial

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass reads)
from oiv2compile.config import Backend, BuildConfig, Device, Quantization
from oiv2compile.passes.fx_utils import (
    aten,
    attr_names,
    attr_tensor,
    call_args,
    derived_weights,
    drop_attr,
    is_call,
    record,
)
from oiv2compile.passes.quantize_weights import DECODER_LAYER

log = logging.getLogger(__name__)

ADD_RMS_NORM = torch.ops.oiv2.add_rms_norm.default


def applies(cfg: BuildConfig) -> bool:
    """Where the norm can run inside the quantized decode products: both passes ask this."""
    return (
        cfg.fusion.enable_norm_into_linear
        and cfg.quantization in (Quantization.INT8, Quantization.INT4)
        and cfg.quant.enable_cuda_kernels
        and cfg.device is Device.CUDA
        and cfg.backend is Backend.INDUCTOR
    )


def fold_norm_weights(gm: GraphModule, cfg: BuildConfig) -> int:
    if not applies(cfg):
        return 0
    count = 0
    for norm in gm.graph.find_nodes(op="call_function", target=ADD_RMS_NORM):
        weight = norm.args[2]
        g = attr_tensor(gm, weight)
        if g is None or g.dim() != 1 or bool((g == 1).all()) or not bool((g != 0).all()):
            continue
        outs = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
        linears = list(outs[0].users) if len(outs) == 1 else []
        if not linears or not all(_foldable(gm, linear, outs[0], g, cfg) for linear in linears):
            continue
        assert isinstance(weight, Node)
        for linear in linears:
            _fold(gm, linear, g)
        with gm.graph.inserting_before(norm):
            (unit,) = derived_weights(gm, weight, ("unit",), partial(_ones, g))
        norm.replace_input_with(weight, unit)
        drop_attr(gm, weight)
        count += 1
    log.debug("fold_norm_weights: %d norm weights folded into the linears after them", count)
    return count


def _ones(like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"unit": torch.ones_like(like)}


def _foldable(gm: GraphModule, linear: Node, out: Node, g: torch.Tensor, cfg: BuildConfig) -> bool:
    if not is_call(linear, aten.linear.default):
        return False
    args = call_args(linear)
    w_node, w = args["weight"], attr_tensor(gm, args["weight"])
    if args["input"] is not out or w is None or w.dim() != 2 or w.shape[1] != g.shape[0] or w.dtype != g.dtype:
        return False
    readers = gm.graph.find_nodes(op="get_attr", target=w_node.target)
    if len(readers) != 1 or len(w_node.users) != 1 or attr_names(gm, w) != {str(w_node.target)}:  # or tied
        return False
    return DECODER_LAYER.search(str(w_node.target)) is not None or cfg.quant.include_output_head


def _fold(gm: GraphModule, linear: Node, g: torch.Tensor) -> None:
    w_node = call_args(linear)["weight"]
    w = attr_tensor(gm, w_node)
    assert w is not None

    def folded() -> dict[str, torch.Tensor]:
        return {"norm_folded": (w.float() * g.float()[None, :]).to(w.dtype)}

    with gm.graph.inserting_before(linear):
        (new,) = derived_weights(gm, w_node, ("norm_folded",), folded)
    # The HF linear this stands for (unless a fusion recorded its parts already), and g to divide by.
    facts = linear.meta.get("oiv2", {})
    record(
        linear, folded_norm=g.detach().clone(), **({} if "parts" in facts else {"parts": [(w.data_ptr(), w.shape[0])]})
    )
    linear.replace_input_with(w_node, new)
    drop_attr(gm, w_node)
