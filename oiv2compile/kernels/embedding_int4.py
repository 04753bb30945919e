"""oiv2::embedding_int4: the rows `indices` of an embedding table stored as packed 4-bit integers with
a scale and zero point per group of features.

Layout: that of oiv2::linear_int4 ("int4-grouphalves-v2") with the table [V, D] as the weight:
packed [V, D/2] uint8, scales and zeros [V, D/g] in the activation dtype; row v is
(q[v, k] - zeros[v, k // g]) * scales[v, k // g]. A tied table is the output head's weight, so the
lookup and the head read the same quantized tensors.

A lookup reads B * S rows, a few kilobytes: no kernel of its own. The op's body is its reference,
which Inductor (and AOTInductor) inline into one gather-and-dequantize kernel.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from oiv2compile.kernels._triton import registering_triton_op
from oiv2compile.kernels.linear_int4 import dequantize


def embedding_int4_ref(
    indices: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """The spec: dequantize the rows that `indices` [...] select; [..., D] in the scales' dtype."""
    flat = indices.reshape(-1)
    rows = dequantize(packed[flat], scales[flat], zeros[flat])  # [n, D]
    return rows.reshape(*indices.shape, 2 * packed.shape[1])


with registering_triton_op():

    @triton_op("oiv2::embedding_int4", mutates_args=())
    def embedding_int4(
        indices: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
    ) -> torch.Tensor:
        return embedding_int4_ref(indices, packed, scales, zeros)
