"""tile_int8_weights: int8 weights that only products read go into int8-tiles16x1024-v2.

Before (after use_cuda_kernels and the gemv fusions):
    y = oiv2.<int8 product>(x, qweight, scales, ...)       # qweight [N, K] int8-rowmajor-v1
After:
    y = oiv2.<int8 product>(x, qweight_tiles, scales, ...)  # qweight_tiles [N/16, 16, K] int8-tiles16x1024-v2
A gated MLP's gate/up weight (read by oiv2::rms_norm_linear_int8_gemv_gated_act, or by a product whose output
oiv2::gated_act takes: the same weight in each program) goes into the paired form, [N/16, 2, 8, K]
(int8-tiles16x1024-paired-v2), whose block b holds the gate and up rows of outputs 8b..: the block the gated
product's one-row kernel takes, so a stage is one copy there too.
The products are oiv2::linear_int8 (the Triton op), oiv2::linear_int8_gemm, oiv2::linear_int8_gemv and its
fused forms; each reads either layout (kernels/linear_int8.py). A weight goes only where N is a multiple of
16 and K of 128 and nothing but those products reads it: a tied embedding table's lookup keeps the head's
row-major tensor. Every program makes the same tensor under the same name, so the artifact stores it once.

Why: the one-row product streams each stage of 16 rows x 1024 features as one bulk copy instead of 16 copies
of 1 KB a row, and its consumer warps read their fragments as 512 contiguous bytes. H200, 32 llama-8b layers
of int8 products (norms and activation inside): 1850.5-1856.0 us a step against 1994.7-2010.1 row-major;
llama-8b int8 decode 1.88-1.94x bf16 (benchmarks/RESULTS.md, thirty-second session).

Preconditions: a CUDA build through Inductor with int8 products on the C++ kernels (use_cuda_kernels).
"""

from __future__ import annotations

import functools

import torch
from torch.fx import GraphModule, Node

from oiv2compile.config import Backend, BuildConfig, Device
from oiv2compile.kernels.linear_int8 import PAIRED_TILES_LAYOUT, TILES_LAYOUT, tile, tiles_fit
from oiv2compile.passes.fx_utils import attr_tensor, derived_weights, drop_attr, record

# The products that read qweight (their second argument) in either layout.
PRODUCTS = (
    torch.ops.oiv2.linear_int8.default,
    torch.ops.oiv2.linear_int8_gemm.default,
    torch.ops.oiv2.linear_int8_gemv.default,
    torch.ops.oiv2.linear_int8_gemv_add.default,
    torch.ops.oiv2.rms_norm_linear_int8_gemv.default,
    torch.ops.oiv2.rms_norm_linear_int8_gemv_gated_act.default,
)


def tile_int8_weights(gm: GraphModule, cfg: BuildConfig) -> int:
    if cfg.device is not Device.CUDA or cfg.backend is not Backend.INDUCTOR or not cfg.quant.int8_tiles:
        return 0
    readers: dict[int, list[Node]] = {}  # a tensor's get_attr nodes, under any of its names (a tied table's)
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = attr_tensor(gm, node)
        if tensor is not None:
            readers.setdefault(id(tensor), []).append(node)
    count = 0
    for weight in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        q = attr_tensor(gm, weight)
        if q is None or q.dtype != torch.int8 or q.dim() != 2:
            continue
        if not all(_only_products(node) for node in readers[id(q)]):
            continue
        if not tiles_fit(*q.shape):
            continue
        paired = any(_gated(user) for node in readers[id(q)] for user in node.users)
        with gm.graph.inserting_after(weight):
            (tiles,) = derived_weights(gm, weight, ("tiles",), functools.partial(_tiles, q, paired))
        for user in list(weight.users):
            user.replace_input_with(weight, tiles)
            record(user, layout=PAIRED_TILES_LAYOUT if paired else TILES_LAYOUT)
        drop_attr(gm, weight)
        count += 1
    return count


def _tiles(qweight: torch.Tensor, paired: bool) -> dict[str, torch.Tensor]:
    return {"tiles": tile(qweight, paired)}


def _gated(product: Node) -> bool:
    """Whether a product makes a gated MLP's gate and up halves: the gated product, or one whose output
    oiv2::gated_act takes."""
    return product.target == torch.ops.oiv2.rms_norm_linear_int8_gemv_gated_act.default or any(
        user.target == torch.ops.oiv2.gated_act.default for user in product.users
    )


def _only_products(weight: Node) -> bool:
    """Whether every reader of the get_attr is a product taking it as qweight."""
    return bool(weight.users) and all(
        user.op == "call_function"
        and user.target in PRODUCTS
        and user.args[1] is weight
        and weight not in user.args[2:]
        for user in weight.users
    )
