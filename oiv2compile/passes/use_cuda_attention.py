"""use_cuda_attention: a decode program's oiv2::rope_kv_write_attention runs on the C++ kernel that copies
the cached keys and values before the q/k/v product has ended (oiv2::prefetched_decode_attention).

Before (after fuse_rope_into_attention):
    out = oiv2.rope_kv_write_attention(qkv, cos_table, sin_table, position_ids, k_cache, v_cache, slots,
                                       positions, Hq, Hkv, scale)                       # Triton
After:
    out = oiv2.prefetched_decode_attention(<the same arguments>)                        # CUDA C++
One rewrite per attention layer of a decode program whose fused q/k/v row comes from one of our C++
products (a node that records its kernel library) and whose shapes the kernel takes
(kernels/prefetched_decode_attention.py `takes`: bf16 or fp16, D 64 or 128, at most 8 query heads a kv
head, a cache of at most 256 positions); other calls keep the Triton op.

Why: AOTInductor launches Triton kernels after the kernel before them has ended, so the Triton attention
starts its walk over the cache only then. The C++ kernel is launched as a programmatic dependent of the
q/k/v product, and our C++ products let the next kernel launch as they start: the cache rows are copied
while the product runs. 32 llama-8b layers of products with a cache of 256 positions (192 filled) between
q/k/v and o, H200 (benchmarks/RESULTS.md): int4 1401-1408 us a step against 1435 with the Triton kernel,
int8 1952 against 2012; with the copies issued after the wait, int4 1466. After cuBLAS (bf16), which lets
nothing launch early, it was slower than the Triton kernel (4275-4280 against 4262), hence the condition.

Preconditions: a CUDA build through Inductor with the quantized products on the C++ kernels (the
registry runs it right after use_cuda_kernels there, unless built with --no-prefetched-attention; the
fusions after it replace the products with other C++ products). The kernel is compiled (nvcc, about a minute the first time, cached after)
and loaded when the pass first needs it; the node records the library, which the Inductor backend copies
into the artifact. Where the compile fails the pass rewrites nothing and logs why.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile.config import BuildConfig
from oiv2compile.kernels import prefetched_decode_attention
from oiv2compile.passes.fx_utils import fake_value, record, strip_views
from oiv2compile.passes.use_cuda_kernels import compiled_library

log = logging.getLogger(__name__)

TRITON = torch.ops.oiv2.rope_kv_write_attention.default
PREFETCHED = torch.ops.oiv2.prefetched_decode_attention.default


def use_cuda_attention(gm: GraphModule, cfg: BuildConfig) -> int:
    count = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=TRITON)):
        qkv, cos_table, _sin, _ids, k_cache = (fake_value(a) for a in node.args[:5])
        num_heads, num_kv_heads = node.args[8], node.args[9]
        if any(v is None for v in (qkv, cos_table, k_cache)) or node.kwargs or not _from_cuda_kernel(node.args[0]):
            continue
        if not prefetched_decode_attention.takes(qkv, cos_table, k_cache, num_heads, num_kv_heads):  # type: ignore[arg-type]
            continue
        library = compiled_library(prefetched_decode_attention)
        if library is None:
            return count
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(PREFETCHED, node.args)
        fused.meta["val"] = fake_value(node)
        record(fused, **{**node.meta.get("oiv2", {}), "library": library.name})
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        count += 1
    log.debug("use_cuda_attention: %d layers on the C++ kernel", count)
    return count


def _from_cuda_kernel(qkv: Any) -> bool:
    """Whether the row comes (through views) from one of our C++ kernels, which let the next kernel launch
    as they start: use_cuda_kernels and the fusions after it record the library on such nodes."""
    producer = strip_views(qkv)
    return isinstance(producer, Node) and "library" in producer.meta.get("oiv2", {})
