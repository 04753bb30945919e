"""quantize_weights: linear layers read weight-only quantized weights through oiv2::linear_int8 or
oiv2::linear_int4.

Before (W a 2-D floating attribute of the graph):
    y = aten.linear(x, W, bias)
After:
    y = oiv2.linear_int8(x, W_int8, W_scales, bias)                       # --quant int8
    y = oiv2.linear_int4(x, W_int4, W_scales, W_zeros, bias)              # --quant int4
The quantized tensors (layouts in kernels/linear_int8.py and kernels/linear_int4.py, made by round to
nearest) become attributes next to W, named W's attribute name plus `_int8`/`_int4`, `_scales`,
`_zeros`; W itself goes when nothing else reads it (a tied embedding still does). Every linear under
a decoder layer (`.layers.<n>.`) is rewritten; the others (the output head) when
cfg.quant.include_output_head. A calibrated method (GPTQ, AWQ) would replace `_quantized_tensors`,
which sees the float weight and returns the same layout.

Every program of a build runs this on the same weights and gets the same tensors under the same
names, so the artifact stores them once.
"""

from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig, Quantization
from oiv2compile.errors import ConfigError
from oiv2compile.kernels.linear_int4 import quantize as quantize_int4
from oiv2compile.kernels.linear_int8 import quantize as quantize_int8
from oiv2compile.passes.fx_utils import (
    aten,
    attr_tensor,
    call_args,
    derived_weights,
    drop_attr,
    fake_value,
    is_call,
    record,
)

DECODER_LAYER = re.compile(r"\.layers\.\d+\.")


def quantize_weights(gm: GraphModule, cfg: BuildConfig) -> int:
    if cfg.quantization is Quantization.NONE:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.linear.default):
            continue
        args = call_args(node)
        weight = args["weight"]
        tensor = attr_tensor(gm, weight)
        if tensor is None or tensor.dim() != 2 or not tensor.is_floating_point():
            continue
        assert isinstance(weight, Node)
        if DECODER_LAYER.search(str(weight.target)) is None and not cfg.quant.include_output_head:
            continue
        out = fake_value(node)
        dtype = out.dtype if out is not None else tensor.dtype
        with gm.graph.inserting_before(node):
            attrs = quantized_attrs(gm, weight, tensor, cfg, dtype)
            op = (
                torch.ops.oiv2.linear_int8.default
                if cfg.quantization is Quantization.INT8
                else torch.ops.oiv2.linear_int4.default
            )
            new = gm.graph.call_function(op, (args["input"], *attrs, args.get("bias")))
        new.meta.update(node.meta)
        # verify.py finds the HF linear that read this weight by its storage, to compare like with like.
        record(new, quantized=str(weight.target), scheme=cfg.quantization.value, storage=tensor.data_ptr())
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        drop_attr(gm, weight)
        count += 1
    return count


def quantized_attrs(
    gm: GraphModule, weight: Node, tensor: torch.Tensor, cfg: BuildConfig, dtype: torch.dtype
) -> list[Node]:
    """get_attr nodes, at the insertion point, for the quantized layout of the float weight `tensor`
    that the get_attr `weight` reads: attributes named after it plus `_int8`/`_int4`, `_scales`,
    `_zeros`, computed once (a tied table and its head, or a later program, find them made)."""
    suffixes = ("int8", "scales") if cfg.quantization is Quantization.INT8 else ("int4", "scales", "zeros")
    return derived_weights(gm, weight, suffixes, lambda: _quantized_tensors(str(weight.target), tensor, cfg, dtype))


def _quantized_tensors(
    name: str, weight: torch.Tensor, cfg: BuildConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The quantized layout of one weight, by attribute suffix; round to nearest."""
    if cfg.quantization is Quantization.INT8:
        q, scales = quantize_int8(weight, dtype)
        return {"int8": q, "scales": scales}
    group = cfg.quant.group_size
    if weight.shape[1] % group:
        raise ConfigError(
            f"{name} has {weight.shape[1]} input features, not a multiple of the int4 group size {group}; "
            "choose another --quant-group-size (32, 64, 128) or --quant int8."
        )
    packed, scales, zeros = quantize_int4(weight, group, dtype)
    return {"int4": packed, "scales": scales, "zeros": zeros}
