"""fuse_rope_kv_write: a layer's rotary embedding of q and k and its two cache writes become one
oiv2::rope_kv_write reading the fused q/k/v projection's output.

Before (after fuse_qkv, rewrite_kv_cache and substitute_attention; Hugging Face's
apply_rotary_pos_emb as export records it, `rot(x) = x * c + cat(-x[..., D/2:], x[..., :D/2]) * s`):
    q, k, v = aten.split_with_sizes(qkv, [Hq * D, Hkv * D, Hkv * D], -1)   # qkv [B, S, (Hq + 2 Hkv) * D]
    q, k, v = (aten.transpose(aten.view(t, [B, S, -1, D]), 1, 2) for t in (q, k, v))   # [B, H, S, D]
    c, s    = aten.unsqueeze(cos, 1), aten.unsqueeze(sin, 1)                # cos, sin [B, S, D]
    oiv2.kv_write(k_cache, rot(k), slots, positions)
    oiv2.kv_write(v_cache, v, slots, positions)
    out     = oiv2.attention(rot(q), k_cache, v_cache, slots, positions, scale)
    where, computed once for all layers by Hugging Face's rotary embedding,
    freqs   = aten.transpose(aten.matmul(inv_freq [1, D/2, 1] (expanded), position_ids [B, 1, S]), 1, 2)
              (transformers 5.17), or aten.mul(position_ids [B, S, 1], inv_freq [D/2]) (later 5.x releases)
    cos     = aten.to(aten.mul(aten.cos(aten.cat([freqs, freqs], -1)), scaling), dtype)   # sin alike
After:
    q_rot   = oiv2.rope_kv_write(qkv, cos_table, sin_table, position_ids, k_cache, v_cache, slots,
                                 positions, Hq, Hkv)                                       # [B, Hq, S, D]
    out     = oiv2.attention(q_rot, k_cache, v_cache, slots, positions, scale)
and position_ids None where the graph computes them as the cache positions,
    position_ids = aten.add(aten.unsqueeze(positions, 1), aten.unsqueeze(aten.arange(S), 0))
(as the executor's programs do): the kernel then adds t to positions[b] itself, and no [B, S] ids are
left for Inductor to recompute before every layer. cos_table, sin_table [T, D/2] (T the cache length) made at build time by
`rope_kv_write.rotary_tables` from inv_freq and the scaling, the same values HF computes at each
position, registered once per graph next to inv_freq. The graph then holds no cos/sin tensor: left
there, Inductor recomputed it for every layer inside another kernel. One rewrite per attention
layer. The rotation is matched as a pattern; pairing it with the cache writes and tracing cos and sin
back to inv_freq are node walks (attention depends on the writes through the mutated caches, not
through a value a pattern could follow).

Preconditions: fuse_qkv ran (q, k and v are the three parts of one split of a [B, S, W] tensor, each
viewed as [B, S, H, D] and transposed); q and k are rotated with the same cos and sin, [B, S, D] in
qkv's dtype, over the whole head dimension (half = D / 2), computed as above from a 1-D float
inv_freq attribute of D/2 frequencies and integer position ids [B, S]; the rotated q feeds only the
attention and the rotated k only its cache write; both writes use the attention's slots and
positions. Skips a layer without rotary embedding, partial rotary (half < D / 2), angles computed
any other way, and layers whose projections were not fused.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.kernels.rope_kv_write import rotary_tables
from oiv2compile.passes.fx_utils import (
    Match,
    add_weight,
    aten,
    attr_tensor,
    fake_value,
    find_pattern,
    is_call,
    join_target,
    record,
    strip_views,
)

log = logging.getLogger(__name__)

_KV_WRITE = torch.ops.oiv2.kv_write.default
_ATTENTION = torch.ops.oiv2.attention.default
_HEAD_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CASTS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default)


def _rotary(x, cos, sin, dim_lo, start, half_lo, dim_hi, half_hi, end, cat_dim):  # type: ignore[no-untyped-def]
    rotated = aten.cat.default(
        [aten.neg.default(aten.slice.Tensor(x, dim_hi, half_hi, end)), aten.slice.Tensor(x, dim_lo, start, half_lo)],
        cat_dim,
    )
    return aten.add.Tensor(aten.mul.Tensor(x, cos), aten.mul.Tensor(rotated, sin))


@dataclass(frozen=True)
class _Angles:
    """What HF's cos and sin are computed from."""

    inv_freq: Node  # get_attr, [D/2] float
    position_ids: Node  # [B, S] integer
    scaling: float
    dtype: torch.dtype


@dataclass(frozen=True)
class _Layer:
    qkv: Node
    angles: _Angles
    writes: tuple[Node, Node]  # the k and v cache writes
    num_heads: int
    num_kv_heads: int


def fuse_rope_kv_write(gm: GraphModule, cfg: BuildConfig) -> int:
    rotations = {m.outputs[0]: m for m in find_pattern(gm, _rotary, _whole_head_rotation)}
    writes = {node.args[0]: node for node in gm.graph.find_nodes(op="call_function", target=_KV_WRITE)}
    tables: dict[tuple[Any, ...], tuple[Node, Node]] = {}  # one pair per graph and rotary embedding
    count = 0
    for attention in list(gm.graph.find_nodes(op="call_function", target=_ATTENTION)):
        layer = _layer(gm, attention, rotations, writes)
        if layer is None:
            continue
        _rewrite(gm, attention, layer, tables)
        count += 1
    log.debug("fuse_rope_kv_write: %d layers fused", count)
    return count


def _whole_head_rotation(match: Match) -> bool:
    a = match.args
    x = fake_value(a["x"])
    if x is None or x.dim() != 4:
        return False
    d = x.shape[-1]
    ints = [a[name] for name in ("dim_lo", "start", "half_lo", "dim_hi", "half_hi", "end", "cat_dim")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or not isinstance(d, int):
        return False
    return (
        a["dim_lo"] in (3, -1)
        and a["dim_hi"] in (3, -1)
        and a["cat_dim"] in (3, -1)
        and a["start"] == 0
        and a["half_lo"] == a["half_hi"] == d // 2
        and d % 2 == 0
        and a["end"] >= d
    )


def _layer(gm: GraphModule, attention: Node, rotations: dict[Any, Match], writes: dict[Any, Node]) -> _Layer | None:
    args: tuple[Any, ...] = attention.args
    q_rot, k_cache, v_cache, slots, positions = args[:5]
    write_k, write_v = writes.get(k_cache), writes.get(v_cache)
    if write_k is None or write_v is None:
        return None
    if any(tuple(w.args[2:4]) != (slots, positions) for w in (write_k, write_v)):
        return None
    k_rot: Any = write_k.args[1]
    rot_q, rot_k = rotations.get(q_rot), rotations.get(k_rot)
    if rot_q is None or rot_k is None or len(q_rot.users) != 1 or len(k_rot.users) != 1:
        return None
    cos_u, sin_u = rot_q.args["cos"], rot_q.args["sin"]
    if rot_k.args["cos"] is not cos_u or rot_k.args["sin"] is not sin_u:
        return None
    parts = [_head_part(x) for x in (rot_q.args["x"], rot_k.args["x"], write_v.args[1])]
    if any(p is None for p in parts):
        return None
    splits = {p[0] for p in parts if p is not None}
    if len(splits) != 1 or [p[1] for p in parts if p is not None] != [0, 1, 2]:
        return None
    split = splits.pop()
    cos, sin = _squeezed(cos_u), _squeezed(sin_u)
    if cos is None or sin is None:
        return None
    qkv: Any = split.args[0]
    sizes: Any = split.args[1]
    heads = _head_counts(qkv, sizes, cos, sin, fake_value(rot_q.args["x"]), fake_value(write_v.args[1]))
    if heads is None:
        return None
    angles = _angles(gm, cos, sin, half=sizes[0] // heads[0] // 2)
    if angles is None:
        return None
    return _Layer(qkv, angles, (write_k, write_v), *heads)


def _angles(gm: GraphModule, cos: Any, sin: Any, half: int) -> _Angles | None:
    """HF's rotary embedding behind cos and sin: to(mul(cos(cat([f, f], -1)), scaling), dtype), sin
    alike from the same cat, with f = transpose(matmul(inv_freq expanded, position_ids as float), 1, 2)
    or f = mul(position_ids as float, inv_freq): both one float32 product per element, which is what
    rotary_tables computes."""
    parts = [_trig(cos, aten.cos.default), _trig(sin, aten.sin.default)]
    if parts[0] is None or parts[1] is None or parts[0] != parts[1]:
        return None
    cat, scaling = parts[0]
    if not is_call(cat, aten.cat.default) or len(cat.args[0]) != 2 or cat.args[0][0] is not cat.args[0][1]:
        return None
    if len(cat.args) > 1 and cat.args[1] not in (-1, 2):
        return None
    factors = _angle_factors(cat.args[0][0])
    if factors is None:
        return None
    inv_freq, position_ids = (strip_views(f, _CASTS) for f in factors)
    if attr_tensor(gm, inv_freq) is None:  # the broadcast product may have its factors either way round
        inv_freq, position_ids = position_ids, inv_freq
    frequencies, ids = attr_tensor(gm, inv_freq), fake_value(position_ids)
    if frequencies is None or frequencies.dim() != 1 or not frequencies.is_floating_point():
        return None
    if frequencies.shape[0] != half or ids is None or ids.dim() != 2 or ids.is_floating_point():
        return None
    return _Angles(inv_freq, position_ids, scaling, fake_value(cos).dtype)


def _angle_factors(freqs: Any) -> tuple[Any, Any] | None:
    """The two factors of the angles [B, S, D/2]: (inv_freq side, position side) of the matmul form,
    the two operands of the broadcast product; else None."""
    if is_call(freqs, aten.transpose.int) and sorted(freqs.args[1:3]) == [1, 2]:
        product = freqs.args[0]
        if is_call(product, aten.matmul.default, aten.bmm.default):
            return product.args[0], product.args[1]
        return None
    if is_call(freqs, aten.mul.Tensor) and all(isinstance(a, Node) for a in freqs.args[:2]):
        return freqs.args[0], freqs.args[1]
    return None


def _trig(node: Any, op: Any) -> tuple[Any, float] | None:
    """(cat, scaling) for to(mul(op(cat), scaling), dtype), the mul and the cast each optional."""
    node = strip_views(node, _CASTS)
    scaling = 1.0
    if is_call(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool):
        scaling, node = float(node.args[1]), node.args[0]
    if not is_call(node, op):
        return None
    return node.args[0], scaling


def _head_part(x: Any) -> tuple[Node, int] | None:
    """(split, index) where x = transpose(view(split[index], [B, S, H, D]), 1, 2), else None."""
    if not is_call(x, aten.transpose.int) or sorted(x.args[1:3]) != [1, 2]:
        return None
    view = x.args[0]
    if not is_call(view, *_HEAD_VIEWS):
        return None
    item = view.args[0]
    if not is_call(item, operator.getitem) or not is_call(item.args[0], aten.split_with_sizes.default):
        return None
    split = item.args[0]
    if len(split.args) < 3 or split.args[2] not in (-1, 2):
        return None
    return split, item.args[1]


def _squeezed(node: Any) -> Node | None:
    """cos for aten.unsqueeze(cos, 1), else None."""
    if not is_call(node, aten.unsqueeze.default) or node.args[1] != 1:
        return None
    return node.args[0]


def _head_counts(qkv: Any, sizes: Any, cos: Node, sin: Node, q_heads: Any, v_heads: Any) -> tuple[int, int] | None:
    """(Hq, Hkv) where qkv [B, S, (Hq + 2 Hkv) * D] splits into sizes [Hq * D, Hkv * D, Hkv * D] and
    cos, sin are [B, S, D] in qkv's dtype; else None."""
    vx, vc, vs = fake_value(qkv), fake_value(cos), fake_value(sin)
    if any(v is None for v in (vx, vc, vs, q_heads, v_heads)) or vx.dim() != 3:
        return None
    num_heads, d = q_heads.shape[1], q_heads.shape[-1]
    num_kv_heads = v_heads.shape[1]
    if not all(isinstance(v, int) for v in (num_heads, num_kv_heads, d)):
        return None
    if list(sizes) != [num_heads * d, num_kv_heads * d, num_kv_heads * d] or vx.shape[-1] != sum(sizes):
        return None
    for trig in (vc, vs):
        if trig.dim() != 3 or trig.shape[-1] != d or trig.dtype != vx.dtype:
            return None
    return num_heads, num_kv_heads


def _rewrite(gm: GraphModule, attention: Node, layer: _Layer, tables: dict[tuple[Any, ...], tuple[Node, Node]]) -> None:
    args: tuple[Any, ...] = attention.args
    q_rot, k_cache, v_cache, slots, positions = args[:5]
    cos_table, sin_table = _tables(gm, layer.angles, int(fake_value(k_cache).shape[2]), tables)
    position_ids = layer.angles.position_ids
    rotary_positions = None if _is_cache_positions(position_ids, positions) else position_ids
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first = min(layer.writes, key=order.__getitem__)
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(
            torch.ops.oiv2.rope_kv_write.default,
            (
                layer.qkv,
                cos_table,
                sin_table,
                rotary_positions,
                k_cache,
                v_cache,
                slots,
                positions,
                layer.num_heads,
                layer.num_kv_heads,
            ),
        )
    val = fake_value(q_rot)
    fused.meta["val"] = val.clone(memory_format=torch.contiguous_format) if val is not None else None  # [B, Hq, S, D]
    record(fused, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads)
    attention.replace_input_with(q_rot, fused)
    for write in layer.writes:
        gm.graph.erase_node(write)


def _is_cache_positions(position_ids: Node, positions: Any) -> bool:
    """Whether position_ids = positions[:, None] + arange(S)[None, :] (either order of the sum), S
    the ids' second size."""
    if not is_call(position_ids, aten.add.Tensor) or len(position_ids.args) != 2 or position_ids.kwargs:
        return False
    parts = [_unsqueezed(a) for a in position_ids.args]
    column = next((p for p in parts if p is not None and p[0] is positions), None)
    row = next((p for p in parts if p is not None and p is not column), None)
    if column is None or row is None or column[1] != 1 or row[1] != 0:
        return False
    end = _arange_end(row[0])
    ids = fake_value(position_ids)
    if end is None or ids is None or ids.dim() != 2:
        return False
    return _same_size(fake_value(end) if isinstance(end, Node) else end, ids.shape[1])


def _unsqueezed(node: Any) -> tuple[Any, int] | None:
    """(x, dim) for aten.unsqueeze(x, dim), else None."""
    if not is_call(node, aten.unsqueeze.default):
        return None
    return node.args[0], node.args[1]


def _arange_end(node: Any) -> Any:
    """end for aten.arange(end) or aten.arange(0, end[, 1]), else None."""
    if is_call(node, aten.arange.default):
        return node.args[0]
    if is_call(node, aten.arange.start, aten.arange.start_step) and node.args[0] == 0 and node.args[2:] in ((), (1,)):
        return node.args[1]
    return None


def _same_size(a: Any, b: Any) -> bool:
    """Whether two sizes (ints, or SymInts known equal, as the same symbol is) are equal, adding no guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and statically_known_true(a == b)


def _tables(
    gm: GraphModule, angles: _Angles, length: int, tables: dict[tuple[Any, ...], tuple[Node, Node]]
) -> tuple[Node, Node]:
    """get_attr nodes of the cos and sin tables [length, D/2] for these angles, made on first use at the
    top of the graph, as buffers next to inv_freq (the same names and values in every program)."""
    key = (angles.inv_freq.target, angles.scaling, angles.dtype, length)
    if key not in tables:
        frequencies = attr_tensor(gm, angles.inv_freq)
        assert frequencies is not None  # _angles checked it
        cos, sin = rotary_tables(frequencies, length, angles.scaling, angles.dtype)
        parent = str(angles.inv_freq.target).rpartition(".")[0]
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            tables[key] = (
                add_weight(gm, join_target(parent, "cos_table"), cos, like=angles.inv_freq),
                add_weight(gm, join_target(parent, "sin_table"), sin, like=angles.inv_freq),
            )
    return tables[key]
