"""FX helpers shared by the passes: node roles, op tests, and walks through view-like ops."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# Ops that only reshape or re-stride their first argument: a value seen through them is the same data.
VIEW_LIKE = frozenset(
    {
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.expand.default,
        aten.reshape.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.transpose.int,
        aten.permute.default,
        aten.alias.default,
    }
)


def role(node: Any) -> str | None:
    """The role capture gave a placeholder ("input_ids", "positions", "k_cache", ...), if any."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("oiv2", {}).get("role")


def inputs_by_role(gm: GraphModule) -> dict[str, Node]:
    """The tagged non-cache placeholders by role."""
    found = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        r = role(node)
        if r is not None and r not in ("k_cache", "v_cache"):
            found[r] = node
    return found


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def strip_views(node: Any, extra: Iterable[Any] = ()) -> Any:
    """Follow the first argument through view-like ops (and `extra` ops) back to its source."""
    passthrough = VIEW_LIKE | frozenset(extra)
    while isinstance(node, Node) and node.op == "call_function" and node.target in passthrough:
        node = node.args[0]
    return node


def source_placeholders(node: Any) -> set[Node]:
    """Every placeholder whose data `node` is computed from. Reading a tensor's size is not reading
    its data, so the walk stops at sym_size."""
    seen: set[Node] = set()
    found: set[Node] = set()
    stack = [node] if isinstance(node, Node) else []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            found.add(current)
        elif not is_call(current, aten.sym_size.int):
            stack.extend(current.all_input_nodes)
    return found


def depends_only_on(node: Any, allowed: Iterable[Node]) -> bool:
    """True when every placeholder that `node` reads is in `allowed` (attributes and constants are fine)."""
    return source_placeholders(node) <= set(allowed)


def fake_value(node: Any) -> Any:
    """The fake tensor (or SymInt) export recorded for `node`, or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def record(node: Node, **facts: Any) -> None:
    """What a pass learned about a node, kept in node.meta["oiv2"]."""
    node.meta.setdefault("oiv2", {}).update(facts)


def call_args(node: Node) -> dict[str, Any]:
    """The arguments of an ATen call by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    values: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values
