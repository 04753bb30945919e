"""quantize_embedding: the token-embedding lookup reads the table weight-only quantized, through
oiv2::embedding_int8 or oiv2::embedding_int4.

Before (E a 2-D floating attribute of the graph, [V, D]):
    h = aten.embedding(E, input_ids)
After:
    h = oiv2.embedding_int8(input_ids, E_int8, E_scales)                  # --quant int8
    h = oiv2.embedding_int4(input_ids, E_int4, E_scales, E_zeros)         # --quant int4
The table takes the layout of a linear weight [V, D] (per-row scale for int8, groups along D for
int4), made by quantize_weights' own function under the same attribute names: a table tied to the
output head (which quantize_weights has already rewritten) is read from the head's quantized tensors,
and the float table goes once nothing reads it. For an 8B model that is 1 GB of a 5 GB int4 artifact.

Runs after quantize_weights, when cfg.quant.include_embedding; skips a lookup whose table is not a
2-D floating attribute, or is still read in full precision by something else (a tied head built
with --no-quantize-head).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig, Quantization
from oiv2compile.passes.fx_utils import aten, attr_tensor, drop_attr, fake_value, is_call, record
from oiv2compile.passes.quantize_weights import quantized_attrs


def quantize_embedding(gm: GraphModule, cfg: BuildConfig) -> int:
    if cfg.quantization is Quantization.NONE or not cfg.quant.include_embedding:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.embedding.default):
            continue
        table, indices = node.args[0], node.args[1]
        tensor = attr_tensor(gm, table)
        if tensor is None or tensor.dim() != 2 or not tensor.is_floating_point():
            continue
        assert isinstance(table, Node)
        readers = [u for n in gm.graph.find_nodes(op="get_attr", target=table.target) for u in n.users]
        if any(reader is not node for reader in readers):
            continue  # a tied head left in full precision: the float table stays, a second copy would not pay
        out = fake_value(node)
        dtype = out.dtype if out is not None else tensor.dtype
        with gm.graph.inserting_before(node):
            attrs = quantized_attrs(gm, table, tensor, cfg, dtype)
            op = (
                torch.ops.oiv2.embedding_int8.default
                if cfg.quantization is Quantization.INT8
                else torch.ops.oiv2.embedding_int4.default
            )
            new = gm.graph.call_function(op, (indices, *attrs))
        new.meta.update(node.meta)
        # verify.py gives the HF embedding the table this layout stands for, found by its storage.
        record(new, quantized=str(table.target), scheme=cfg.quantization.value, storage=tensor.data_ptr(), lookup=True)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        drop_attr(gm, table)
        count += 1
    return count
