"""use_cuda_gemv: one-row quantized products run on the hand-written CUDA C++ GEMVs.

Before (after quantize_weights; x [..., K] with every leading size 1, as in a batch-1 decode step):
    y = oiv2.linear_int8(x, qweight, scales, bias)
    y = oiv2.linear_int4(x, packed, scales, zeros, bias)
After:
    y = aten.reshape(oiv2.linear_int8_gemv(aten.reshape(x, [1, K]), qweight, scales), [..., N])
    y = aten.reshape(oiv2.linear_int4_gemv(aten.reshape(x, [1, K]), packed, scales, zeros), [..., N])
    (+ aten.add(y, bias) where there is a bias)

Why: at one row the C++ kernels stream the weights faster than the Triton kernel the quantized ops
run otherwise (H100, llama-8b shapes: int8 84-87% of the copy bandwidth against 78-80%, int4 54-57%
against 26-34%; benchmarks/RESULTS.md). At 4 rows they lose to it, so only products of one row are
rewritten, and only where that row count is a fixed 1 (a symbolic batch is left to the Triton op)
and the activations are bf16 or fp16 (the kernels' types; float32 builds keep the Triton op).

Preconditions: a CUDA build through Inductor with a quantization scheme. The kernels are compiled
(nvcc, about a minute the first time, cached after) and loaded when the pass first needs them; the
node records the library, which the Inductor backend copies into the artifact and loads before the
program. Where the compile fails the pass rewrites nothing and logs why: the Triton op stays.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile.config import Backend, BuildConfig, Device, Quantization
from oiv2compile.kernels import linear_int4_gemv, linear_int8_gemv
from oiv2compile.passes.fx_utils import aten, call_args, fake_value, record

log = logging.getLogger(__name__)

_GEMV = {
    torch.ops.oiv2.linear_int8.default: (torch.ops.oiv2.linear_int8_gemv.default, linear_int8_gemv),
    torch.ops.oiv2.linear_int4.default: (torch.ops.oiv2.linear_int4_gemv.default, linear_int4_gemv),
}


def use_cuda_gemv(gm: GraphModule, cfg: BuildConfig) -> int:
    if cfg.device is not Device.CUDA or cfg.backend is not Backend.INDUCTOR or cfg.quantization is Quantization.NONE:
        return 0
    count = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
        if node.target not in _GEMV or _rows(node) != 1 or not _kernel_takes(node):
            continue
        gemv, module = _GEMV[node.target]
        library = _library(module)
        if library is None:
            return count
        _rewrite(gm, node, gemv, library)
        count += 1
    return count


def _rows(node: Node) -> int | None:
    """The product's row count when every size of x but the last is a fixed int, else None."""
    x = fake_value(call_args(node)["x"])
    if x is None or x.dim() < 1 or not all(isinstance(s, int) for s in x.shape):
        return None
    return math.prod(x.shape[:-1])


def _kernel_takes(node: Node) -> bool:
    """What the C++ kernels check (csrc/): bf16 or fp16 activations, K a multiple of 16."""
    x = fake_value(call_args(node)["x"])
    return x.dtype in (torch.bfloat16, torch.float16) and isinstance(x.shape[-1], int) and x.shape[-1] % 16 == 0


_LIBRARIES: dict[str, Path | None] = {}


def _library(module: Any) -> Path | None:
    """The compiled kernel library of a GEMV module, loaded; None (logged once) where it fails."""
    name = module.__name__
    if name not in _LIBRARIES:
        try:
            _LIBRARIES[name] = module.load_extension()
        except Exception as exc:  # nvcc missing or failing: the Triton op serves
            log.warning("use_cuda_gemv: %s did not compile (%s); the Triton kernels stay", name, exc)
            _LIBRARIES[name] = None
    return _LIBRARIES[name]


def _rewrite(gm: GraphModule, node: Node, gemv: Any, library: Path) -> None:
    args = call_args(node)
    x, bias = args["x"], args.get("bias")
    weights = [a for a in node.args[1:] if a is not bias]
    x_val, out_val = fake_value(x), fake_value(node)
    k = x_val.shape[-1]
    with gm.graph.inserting_before(node):
        row = gm.graph.call_function(aten.reshape.default, (x, [1, k]))
        row.meta["val"] = x_val.reshape(1, k)
        product = gm.graph.call_function(gemv, (row, *weights))
        product.meta["val"] = out_val.reshape(1, out_val.shape[-1])
        y = gm.graph.call_function(aten.reshape.default, (product, list(out_val.shape)))
        y.meta["val"] = out_val
        if bias is not None:
            y = gm.graph.call_function(aten.add.Tensor, (y, bias))
            y.meta["val"] = out_val
    record(product, **{**node.meta.get("oiv2", {}), "library": library.name})
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)


def libraries(gm: GraphModule) -> list[Path]:
    """The kernel libraries the program's GEMV nodes need, in the order first used."""
    names = {n.meta["oiv2"]["library"] for n in gm.graph.nodes if "library" in n.meta.get("oiv2", {})}
    paths = [p for p in _LIBRARIES.values() if p is not None and p.name in names]
    return sorted(set(paths), key=lambda p: p.name)
