"""ONNX translations of the oiv2 ops, written with ONNX Script for torch.onnx's custom_translation_table.

Imported only by backends/onnx.py, once onnxscript is known to be installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxscript
import torch

import oiv2compile.kernels
import oiv2compile.kernels.cached_attention  # noqa: F401  (registers the ops the table names)

# Untyped on purpose: ONNX Script's typed opsets reject the Constant shapes these functions pass.
op: Any = onnxscript.opset18

_MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _contrib_op(
    name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], attributes: dict[str, Any]
) -> Any:
    """An ONNX Script op for an ONNX Runtime contrib op. The onnx package does not know their
    schemas; this states the part of each that the translations use (input and output names with
    their type variables, attribute types), enough for the exporter to build the node."""
    from onnx.defs import OpSchema

    floats = ["tensor(float)", "tensor(float16)"]
    types = {"T": floats, "T1": floats, "T2": ["tensor(uint8)"], "M": ["tensor(int32)"]}
    used = {t for _, t in inputs + outputs}
    schema = OpSchema(
        name,
        "com.microsoft",
        1,
        inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, types[t], "") for t in sorted(used)],
        attributes=[OpSchema.Attribute(a, kind, "") for a, kind in attributes.items()],
    )
    return onnxscript.values.Op(_MSFT, name, schema)


def _attr(kind: str) -> Any:
    from onnx.defs import OpSchema

    return {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}[kind]


_GROUP_QUERY_ATTENTION = _contrib_op(
    "GroupQueryAttention",
    [
        ("query", "T"),
        ("key", "T"),
        ("value", "T"),
        ("past_key", "T"),
        ("past_value", "T"),
        ("seqlens_k", "M"),
        ("total_sequence_length", "M"),
    ],
    [("output", "T"), ("present_key", "T"), ("present_value", "T")],
    {"num_heads": _attr("int"), "kv_num_heads": _attr("int"), "scale": _attr("float")},
)
_MATMUL_NBITS = _contrib_op(
    "MatMulNBits",
    [("A", "T1"), ("B", "T2"), ("scales", "T1"), ("zero_points", "T1")],
    [("Y", "T1")],
    {name: _attr("int") for name in ("K", "N", "bits", "block_size", "accuracy_level")},
)

_FLOAT = 1  # onnx.TensorProto.FLOAT
_INT32 = 6  # onnx.TensorProto.INT32
_INT64 = 7


def cached_attention(
    q: Any,
    k: Any,
    v: Any,
    k_cache: Any,
    v_cache: Any,
    positions: Any,
    scale: float,
    num_heads: int,
    kv_heads: int,
) -> tuple[Any, Any, Any]:
    """GroupQueryAttention over caches [B, Hkv, T, D] (BNSH). seqlens_k[b] is the index of sequence
    b's last new token; a right-padded prompt's padding is treated as tokens, which only its own
    (discarded) query rows can see under the causal mask."""
    to_bsh = op.Constant(value_ints=[0, 0, -1])
    q_bsh = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), to_bsh)  # [B, S, Hq*D]
    k_bsh = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), to_bsh)  # [B, S, Hkv*D]
    v_bsh = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), to_bsh)
    seq = op.Shape(q, start=2, end=3)  # [1]
    ends = op.Add(positions, seq)  # [B]: one past each sequence's last new token
    seqlens_k = op.Cast(op.Sub(ends, op.Constant(value_ints=[1])), to=_INT32)
    total = op.Cast(op.ReduceMax(ends, keepdims=0), to=_INT32)  # scalar
    out, present_k, present_v = _GROUP_QUERY_ATTENTION(
        q_bsh,
        k_bsh,
        v_bsh,
        k_cache,
        v_cache,
        seqlens_k,
        total,
        num_heads=num_heads,
        kv_num_heads=kv_heads,
        scale=scale,
    )
    out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, num_heads, -1])), perm=[0, 2, 1, 3])
    return out, present_k, present_v  # [B, Hq, S, D], caches


def _ints(*values: int) -> Any:
    return op.Constant(value_ints=list(values))


def cached_attention_standard_ops(
    q: Any,
    k: Any,
    v: Any,
    k_cache: Any,
    v_cache: Any,
    positions: Any,
    scale: float,
    num_heads: int,
    kv_heads: int,
) -> tuple[Any, Any, Any]:
    """The same contract in standard ONNX ops, for where GroupQueryAttention is wrong (its CUDA
    kernel at one new token, backends/onnx.py): ScatterND writes k and v [B, Hkv, S, D] at
    positions[b] + s of the caches [B, Hkv, T, D] (in place where present and past share a buffer),
    then softmax(q K^T * scale) V over the whole cache, keys past each query's position masked, the
    group's query heads as rows of their kv head. Reads all T positions: slower than a fused kernel
    on long caches, correct everywhere."""
    group = num_heads // kv_heads
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    batch = op.Shape(q, start=0, end=1)  # [1]
    seq = op.Shape(q, start=2, end=3)  # [1]
    head_dim = op.Shape(q, start=3, end=4)  # [1]
    cache_len = op.Shape(k_cache, start=2, end=3)  # [1]
    steps = op.Range(zero, op.Squeeze(seq, _ints(0)), one)  # [S]
    token_pos = op.Add(op.Unsqueeze(positions, _ints(1)), op.Unsqueeze(steps, _ints(0)))  # [B, S]
    # Scatter indices [B, Hkv, S, 3]: (row, kv head, position) of each new key and value.
    grid = op.Concat(batch, _ints(kv_heads), seq, axis=0)  # [3]
    rows = op.Expand(op.Reshape(op.Range(zero, op.Squeeze(batch, _ints(0)), one), _ints(-1, 1, 1)), grid)
    heads = op.Expand(op.Reshape(_ints(*range(kv_heads)), _ints(1, -1, 1)), grid)
    times = op.Expand(op.Unsqueeze(token_pos, _ints(1)), grid)
    index = op.Concat(
        op.Unsqueeze(rows, _ints(3)), op.Unsqueeze(heads, _ints(3)), op.Unsqueeze(times, _ints(3)), axis=3
    )
    present_k = op.ScatterND(k_cache, index, k)
    present_v = op.ScatterND(v_cache, index, v)
    # Query head h = kv * group + g: [B, Hq, S, D] is [B, Hkv, group * S, D] in the same memory.
    rows_shape = op.Concat(batch, _ints(kv_heads, -1), head_dim, axis=0)
    q_rows = op.Reshape(q, rows_shape)  # [B, Hkv, group * S, D]
    scores = op.Mul(op.Cast(op.MatMul(q_rows, op.Transpose(present_k, perm=[0, 1, 3, 2])), to=_FLOAT), scale)
    query_pos = op.Expand(op.Unsqueeze(token_pos, _ints(1, 2)), op.Concat(batch, _ints(1, group), seq, axis=0))
    query_pos = op.Reshape(query_pos, op.Concat(batch, _ints(1, -1, 1), axis=0))  # [B, 1, group * S, 1]
    keys = op.Reshape(op.Range(zero, op.Squeeze(cache_len, _ints(0)), one), _ints(1, 1, 1, -1))  # [1, 1, 1, T]
    scores = op.Where(op.LessOrEqual(keys, query_pos), scores, op.Constant(value_float=float("-inf")))
    weights = op.CastLike(op.Softmax(scores, axis=-1), q)
    out = op.MatMul(weights, present_v)  # [B, Hkv, group * S, D]
    out = op.Reshape(out, op.Concat(batch, _ints(num_heads), seq, head_dim, axis=0))  # [B, Hq, S, D]
    return out, present_k, present_v


def linear_int8(x: Any, qweight: Any, scales: Any, bias: Any = None) -> Any:
    """y = x @ (qweight * scales[:, None])^T: DequantizeLinear per output channel on the transposed
    int8 weight (the transpose of a constant is folded at build time), then MatMul."""
    w = op.DequantizeLinear(op.Transpose(qweight, perm=[1, 0]), scales, axis=1)  # [K, N]
    y = op.MatMul(x, w)
    return y if bias is None else op.Add(y, bias)


def linear_int4(x: Any, packed: Any, scales: Any, zeros: Any, bias: Any = None) -> Any:
    """MatMulNBits. Our layout holds features j and g/2 + j of a group in byte j; MatMulNBits holds
    features 2i and 2i + 1 in byte i (low nibble first). The repack is written as graph ops on the
    constant weight, which ONNX Runtime folds into a new initializer when it optimizes the model."""
    n, half_k = packed.shape
    groups = scales.shape[1]
    k = 2 * half_k
    group = k // groups
    blocks = op.Reshape(packed, op.Constant(value_ints=[n, groups, group // 2]))  # [N, G, g/2]
    four = op.Constant(value=_uint8(4))
    low = op.BitwiseAnd(blocks, op.Constant(value=_uint8(15)))  # features 0 .. g/2-1 of each group
    high = op.BitShift(blocks, four, direction="RIGHT")  # features g/2 .. g-1
    q = op.Reshape(op.Concat(low, high, axis=2), op.Constant(value_ints=[n, groups, group // 2, 2]))
    even, odd = op.Split(q, axis=3, num_outputs=2)
    repacked = op.BitwiseOr(even, op.BitShift(odd, four, direction="LEFT"))
    repacked = op.Reshape(repacked, op.Constant(value_ints=[n, groups, group // 2]))  # [N, G, g/2]
    flat = op.Constant(value_ints=[-1])
    y = _MATMUL_NBITS(
        x,
        repacked,
        op.Reshape(scales, flat),
        op.Reshape(zeros, flat),
        K=k,
        N=n,
        bits=4,
        block_size=group,
        accuracy_level=0,
    )
    return y if bias is None else op.Add(y, bias)


def _uint8(value: int) -> Any:
    import onnx

    return onnx.helper.make_tensor("c", onnx.TensorProto.UINT8, [], [value])


def table(standard_attention: bool = False) -> dict[Callable[..., Any], Callable[..., Any]]:
    """standard_attention: oiv2::cached_attention in standard ops instead of GroupQueryAttention."""
    return {
        torch.ops.oiv2.cached_attention.default: cached_attention_standard_ops
        if standard_attention
        else cached_attention,
        torch.ops.oiv2.linear_int8.default: linear_int8,
        torch.ops.oiv2.linear_int4.default: linear_int4,
    }
