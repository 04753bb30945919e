"""oiv2::embedding_int8 and oiv2::embedding_int4 against their references and the dequantized table."""

from __future__ import annotations

import pytest
import torch

from oiv2compile.kernels import embedding_int4, embedding_int4_ref, embedding_int8, embedding_int8_ref
from oiv2compile.kernels.linear_int4 import dequantize as dequantize_int4
from oiv2compile.kernels.linear_int4 import quantize as quantize_int4
from oiv2compile.kernels.linear_int8 import dequantize as dequantize_int8
from oiv2compile.kernels.linear_int8 import quantize as quantize_int8

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, dim, ids_shape", [(37, 64, (3, 5)), (258, 96, (1, 1)), (1000, 128, (7,))])
def test_lookups_equal_the_dequantized_table(device, dtype, vocab, dim, ids_shape):
    gen = torch.Generator().manual_seed(vocab + dim)
    table = torch.randn(vocab, dim, generator=gen)
    ids = torch.randint(0, vocab, ids_shape, generator=gen).to(device)
    q, s = (t.to(device) for t in quantize_int8(table, dtype))
    got = embedding_int8(ids, q, s)
    assert got.shape == (*ids_shape, dim) and got.dtype == dtype
    torch.testing.assert_close(got, dequantize_int8(q, s)[ids], rtol=0, atol=0)
    torch.testing.assert_close(got, embedding_int8_ref(ids, q, s), rtol=0, atol=0)
    group = 32
    p, s4, z4 = (t.to(device) for t in quantize_int4(table, group, dtype))
    got = embedding_int4(ids, p, s4, z4)
    assert got.shape == (*ids_shape, dim) and got.dtype == dtype
    torch.testing.assert_close(got, dequantize_int4(p, s4, z4)[ids], rtol=0, atol=0)
    torch.testing.assert_close(got, embedding_int4_ref(ids, p, s4, z4), rtol=0, atol=0)


def test_opcheck():
    table = torch.randn(50, 64)
    ids = torch.randint(0, 50, (2, 3))
    torch.library.opcheck(torch.ops.oiv2.embedding_int8.default, (ids, *quantize_int8(table, torch.float32)))
    torch.library.opcheck(torch.ops.oiv2.embedding_int4.default, (ids, *quantize_int4(table, 32, torch.float32)))
