"""oiv2::embedding_int8: the rows `indices` of an embedding table stored as int8, one scale per row.

Layout: that of oiv2::linear_int8 ("int8-rowmajor-v1") with the table [V, D] as the weight: qweight
[V, D] int8, scales [V] in the activation dtype; row v is qweight[v] * scales[v]. A tied table is
the output head's weight, so the lookup and the head read the same quantized tensors.

A lookup reads B * S rows, a few kilobytes: no kernel of its own. The op's body is its reference,
which Inductor (and AOTInductor) inline into one gather-and-dequantize kernel.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from oiv2compile.kernels._triton import registering_triton_op
from oiv2compile.kernels.linear_int8 import dequantize


def embedding_int8_ref(indices: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The spec: dequantize the rows that `indices` [...] select; [..., D] in the scales' dtype."""
    flat = indices.reshape(-1)
    rows = dequantize(qweight[flat], scales[flat])  # [n, D]
    return rows.reshape(*indices.shape, qweight.shape[1])


with registering_triton_op():

    @triton_op("oiv2::embedding_int8", mutates_args=())
    def embedding_int8(indices: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return embedding_int8_ref(indices, qweight, scales)
