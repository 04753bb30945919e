"""rewrite_kv_cache: the captured cache writes become in-place oiv2::kv_write ops on the executor's cache.

Before (for each layer's k cache and v cache; export may also give the functional form, index_put
followed by a copy_ back into the input):
    cache_w = aten.index_put_(cache, [slots[:, None, None], arange(H)[None, :, None], pos[:, None, :]], new)
    rows    = aten.index(cache_w, [slots])                          # [B, H, T, D], read by attention
After:
    oiv2.kv_write(cache, new, slots, positions)                      # in place, no result
    rows    = aten.index(cache, [slots])

Preconditions: `cache` is a placeholder that capture tagged k_cache or v_cache; the first index is
computed from the slots input alone and the third from the positions input alone; no accumulate.
Any other index_put is left alone. The reads of `rows` stay whole-row reads until
substitute_attention replaces the attention that consumes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile import kernels  # noqa: F401  (registers the oiv2 ops this pass inserts)
from oiv2compile.config import BuildConfig
from oiv2compile.passes.fx_utils import (
    aten,
    depends_only_on,
    inputs_by_role,
    is_call,
    record,
    role,
    source_placeholders,
)

_WRITES = (aten.index_put_.default, aten.index_put.default)


def rewrite_kv_cache(gm: GraphModule, cfg: BuildConfig) -> int:
    inputs = inputs_by_role(gm)
    slots, positions = inputs.get("slots"), inputs.get("positions")
    if slots is None or positions is None:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, *_WRITES) or not _is_cache_write(node, slots, positions):
            continue
        args: Any = node.args
        cache, _, values = args[:3]
        with gm.graph.inserting_before(node):
            write = gm.graph.call_function(torch.ops.oiv2.kv_write.default, (cache, values, slots, positions))
        write.meta["val"] = None
        record(write, layer=cache.meta["oiv2"]["layer"], cache=role(cache))
        for user in list(node.users):
            # The functional form copies the written tensor back into the input; the op wrote in place.
            if is_call(user, aten.copy_.default) and user.args[0] is cache:
                user.replace_all_uses_with(cache)
                gm.graph.erase_node(user)
        node.replace_all_uses_with(cache)
        gm.graph.erase_node(node)
        count += 1
    return count


def _is_cache_write(node: Node, slots: Node, positions: Node) -> bool:
    args: Any = node.args
    cache, indices, values = args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if accumulate or role(cache) not in ("k_cache", "v_cache") or len(indices) != 3:
        return False
    slot_index, head_index, pos_index = indices
    if not (isinstance(slot_index, Node) and isinstance(pos_index, Node) and isinstance(head_index, Node)):
        return False
    if not (slots in source_placeholders(slot_index) and depends_only_on(slot_index, [slots])):
        return False
    if not (positions in source_placeholders(pos_index) and depends_only_on(pos_index, [positions])):
        return False
    if not depends_only_on(head_index, []):
        return False
    new = values.meta.get("val") if isinstance(values, Node) else None
    dst = cache.meta.get("val")
    # [B, H, S, D] into [N, H, T, D]: the same heads and head size.
    return (
        new is not None
        and dst is not None
        and new.dim() == 4
        and new.shape[1] == dst.shape[1]
        and new.shape[3] == dst.shape[3]
    )
