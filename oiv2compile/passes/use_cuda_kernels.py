"""use_cuda_kernels: quantized products run on the hand-written CUDA C++ kernels.

Before (after quantize_weights):
    y = oiv2.linear_int4(x, packed, scales, zeros, bias)                  # any rows
    y = oiv2.linear_int8(x, qweight, scales, bias)                        # x [..., K], one row in all
After:
    y = oiv2.linear_int4_mma(x, packed_mma, scale_zero)                   (+ aten.add(y, bias))
    y = aten.reshape(oiv2.linear_int8_gemv(aten.reshape(x, [1, K]), qweight, scales), [..., N])
                                                                          (+ aten.add(y, bias))
    y = oiv2.linear_int8_gemm(x, qweight, scales)                         # x [..., K], prefill-sized
                                                                          (+ aten.add(y, bias))
int4: every product whose weight fits the tensor-core layout (N a multiple of 16, K of 64, bf16 or
fp16 activations) reads it repacked at build time into int4-mma16x64-v1 (kernels/linear_int4_mma.py),
attributes named after the packed one plus `_mma` and `_scale_zero`; the grouphalves tensors go
unless something else reads them (a tied embedding table's lookup does). Every program makes the same
tensors under the same names, so the artifact stores them once. The op streams the weights once
through the tensor cores up to 32 rows and dequantizes for cuBLAS above, so prefill takes it too.
int8: products of one row (where that count is a fixed 1: the batch-1 decode program) go to the C++
GEMV; products the Triton op would not take (a prefill's symbolic row count, or more than its 64 rows)
to the C++ GEMM, a mixed-input wgmma GEMM on Hopper up to 256 rows, which reads the same tensors;
decode-sized ones keep the Triton op, which beats the GEMV from 4 rows on.

Why (llama-8b, benchmarks/RESULTS.md): where the Triton op does not take the rows, the op's body is its
reference, which Inductor makes one pass dequantizing W into bf16 and a cuBLAS GEMM: the first token of a
128-token prompt took 12.15 ms against bf16's 6.61, and 7.67 against 6.44 with the C++ GEMM (H200). At
one row the int8 GEMV streams at 84-87% of the copy bandwidth on an H100 against the Triton kernel's
78-80%. The int4 op runs gate/up and down in 17-22 us (43-55% of the copy bandwidth, H100 and H200)
against the Triton kernel's 26-34% and tinygemm's 39-58%, stays below bf16's time up to 16 rows (23-25
us against 30-45 us), and makes batch-1 decode of an 8B model 1.45-1.86x the bf16 artifact's tokens/s
where the Triton int4 kernel gave 0.49x.

Preconditions: a CUDA build through Inductor with a quantization scheme. The kernels are compiled
(nvcc, about a minute the first time, cached after) and loaded when the pass first needs them; the
node records the library, which the Inductor backend copies into the artifact and loads before the
program. Where the compile fails the pass rewrites nothing and logs why: the Triton ops stay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile.config import Backend, BuildConfig, Device, Quantization
from oiv2compile.kernels import linear_int4_mma, linear_int8_gemm, linear_int8_gemv
from oiv2compile.kernels._quant_matmul import takes as triton_takes
from oiv2compile.kernels.linear_int4 import group_size_of
from oiv2compile.kernels.linear_int4 import unpack as unpack_grouphalves
from oiv2compile.passes.fx_utils import (
    aten,
    attr_tensor,
    call_args,
    derived_weights,
    drop_attr,
    fake_value,
    fixed_rows,
    record,
)

log = logging.getLogger(__name__)

INT8 = torch.ops.oiv2.linear_int8.default
INT4 = torch.ops.oiv2.linear_int4.default


def use_cuda_kernels(gm: GraphModule, cfg: BuildConfig) -> int:
    if cfg.device is not Device.CUDA or cfg.backend is not Backend.INDUCTOR or cfg.quantization is Quantization.NONE:
        return 0
    count = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
        if node.target is INT4 and _int4_fits(gm, node):
            library = compiled_library(linear_int4_mma)
            if library is None:
                return count
            _rewrite_int4(gm, node, library)
        elif node.target is INT8 and fixed_rows(node) == 1 and _half_precision(node):
            library = compiled_library(linear_int8_gemv)
            if library is None:
                return count
            _rewrite_int8(gm, node, library)
        elif node.target is INT8 and _half_precision(node) and _prefill_sized(node):
            library = compiled_library(linear_int8_gemm)
            if library is None:
                return count
            _rewrite_int8_gemm(gm, node, library)
        else:
            continue
        count += 1
    return count


def _half_precision(node: Node) -> bool:
    """The C++ kernels' activations: bf16 or fp16, with a fixed feature count."""
    x = fake_value(call_args(node)["x"])
    return x is not None and x.dtype in (torch.bfloat16, torch.float16) and isinstance(x.shape[-1], int)


def _prefill_sized(node: Node) -> bool:
    """Rows the Triton op does not take: a prefill's symbolic count, or more than its fixed bound."""
    return not triton_takes(fake_value(call_args(node)["x"]), 8, 0)


def _int4_fits(gm: GraphModule, node: Node) -> bool:
    args = call_args(node)
    packed, scales = attr_tensor(gm, args["packed"]), attr_tensor(gm, args["scales"])
    if packed is None or scales is None or attr_tensor(gm, args["zeros"]) is None or not _half_precision(node):
        return False
    n, k = packed.shape[0], 2 * packed.shape[1]
    return linear_int4_mma.takes(n, k, group_size_of(packed, scales))


_LIBRARIES: dict[str, Path | None] = {}


def compiled_library(module: Any) -> Path | None:
    """The compiled kernel library of a kernel module, loaded; None (logged once) where it fails."""
    name = module.__name__
    if name not in _LIBRARIES:
        try:
            _LIBRARIES[name] = module.load_extension()
        except Exception as exc:  # nvcc missing or failing: the Triton op serves
            log.warning("use_cuda_kernels: %s did not compile (%s); the Triton kernels stay", name, exc)
            _LIBRARIES[name] = None
    return _LIBRARIES[name]


def _rewrite_int4(gm: GraphModule, node: Node, library: Path) -> None:
    args = call_args(node)
    old = [args["packed"], args["scales"], args["zeros"]]
    with gm.graph.inserting_before(node):
        weights = derived_weights(gm, old[0], ("mma", "scale_zero"), lambda: _repacked(gm, old))
        product = gm.graph.call_function(torch.ops.oiv2.linear_int4_mma.default, (args["x"], *weights))
        product.meta["val"] = fake_value(node)
    record(product, **{**node.meta.get("oiv2", {}), "library": library.name, "layout": linear_int4_mma.LAYOUT})
    _replace(gm, node, product, args.get("bias"))
    for attr in old:
        drop_attr(gm, attr)


def _repacked(gm: GraphModule, grouphalves: list[Node]) -> dict[str, torch.Tensor]:
    """The tensors of int4-mma16x64-v1 for the weight that (packed, scales, zeros) hold."""
    packed, scales, zeros = (attr_tensor(gm, a) for a in grouphalves)
    assert packed is not None and scales is not None and zeros is not None
    levels = unpack_grouphalves(packed, group_size_of(packed, scales))
    return {"mma": linear_int4_mma.pack(levels), "scale_zero": linear_int4_mma.scale_zero(scales, zeros)}


def _rewrite_int8(gm: GraphModule, node: Node, library: Path) -> None:
    args = call_args(node)
    x = args["x"]
    x_val, out_val = fake_value(x), fake_value(node)
    k = x_val.shape[-1]
    with gm.graph.inserting_before(node):
        row = gm.graph.call_function(aten.reshape.default, (x, [1, k]))
        row.meta["val"] = x_val.reshape(1, k)
        gemv = gm.graph.call_function(torch.ops.oiv2.linear_int8_gemv.default, (row, args["qweight"], args["scales"]))
        gemv.meta["val"] = out_val.reshape(1, out_val.shape[-1])
        product = gm.graph.call_function(aten.reshape.default, (gemv, list(out_val.shape)))
        product.meta["val"] = out_val
    record(gemv, **{**node.meta.get("oiv2", {}), "library": library.name})
    _replace(gm, node, product, args.get("bias"))


def _rewrite_int8_gemm(gm: GraphModule, node: Node, library: Path) -> None:
    args = call_args(node)
    with gm.graph.inserting_before(node):
        product = gm.graph.call_function(
            torch.ops.oiv2.linear_int8_gemm.default, (args["x"], args["qweight"], args["scales"])
        )
        product.meta["val"] = fake_value(node)
    record(product, **{**node.meta.get("oiv2", {}), "library": library.name})
    _replace(gm, node, product, args.get("bias"))


def _replace(gm: GraphModule, node: Node, product: Node, bias: Any) -> None:
    """Put `product` (+ bias) in place of `node`."""
    out_val = fake_value(node)
    y = product
    if bias is not None:
        with gm.graph.inserting_before(node):
            y = gm.graph.call_function(aten.add.Tensor, (product, bias))
        y.meta["val"] = out_val
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)


def libraries(gm: GraphModule) -> list[Path]:
    """The kernel libraries the program's rewritten nodes need, in the order first used."""
    names = {n.meta["oiv2"]["library"] for n in gm.graph.nodes if "library" in n.meta.get("oiv2", {})}
    paths = [p for p in _LIBRARIES.values() if p is not None and p.name in names]
    return sorted(set(paths), key=lambda p: p.name)
