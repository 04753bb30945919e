"""FX helpers shared by the passes: node roles, op tests, walks through view-like ops, pattern matches
and the weight attributes that fusions add and drop."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from oiv2compile import _torch_compat

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


def fixed_rows(node: Node) -> int | None:
    """The rows of an op's input x (every size but the last, multiplied) where all are fixed ints, else
    None (a dynamic batch or sequence)."""
    x = fake_value(call_args(node)["x"])
    if x is None or x.dim() < 1 or not all(isinstance(s, int) for s in x.shape):
        return None
    return math.prod(x.shape[:-1])


@dataclass(frozen=True)
class Match:
    """One match of a pattern function: `args` maps the function's parameter names to graph nodes
    (or to the literals they matched), `outputs` are the graph nodes behind its return values, in order,
    and `nodes` every graph node the match covers (its operations, not its inputs)."""

    args: dict[str, Any]
    outputs: list[Node]
    nodes: frozenset[Node]


def find_pattern(
    gm: GraphModule, pattern: Callable[..., Any], check: Callable[[Match], bool] = lambda m: True
) -> list[Match]:
    """The matches of `pattern`, a plain function of ATen calls whose parameters are wildcards
    (literals included), for which `check` holds, in the matcher's order (by the graph position of
    the first output), none overlapping an earlier one.
    A match's inner values are read by nothing outside it. `check` runs before overlaps are removed,
    so a match it refuses does not hide one it would take."""
    traced = torch.fx.symbolic_trace(pattern)
    taken: set[Node] = set()
    matches = []
    for m in _torch_compat.match_subgraphs(traced.graph, gm.graph):
        args = {pn.target: value for pn, value in m.nodes_map.items() if pn.op == "placeholder"}
        nodes = frozenset(gn for pn, gn in m.nodes_map.items() if pn.op not in ("placeholder", "output"))
        match = Match(args, list(m.returning_nodes), nodes)
        if nodes & taken or not check(match):
            continue
        taken |= nodes
        matches.append(match)
    return matches


def attr_tensor(gm: GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    owner_name, _, leaf = str(node.target).rpartition(".")
    value = getattr(gm.get_submodule(owner_name), leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def attr_tensors(gm: GraphModule, nodes: list[Any]) -> list[torch.Tensor] | None:
    """The tensors behind get_attr nodes, or None if any is not one."""
    tensors = [attr_tensor(gm, n) for n in nodes]
    return None if any(t is None for t in tensors) else tensors  # type: ignore[return-value]


def add_weight(gm: GraphModule, target: str, value: torch.Tensor, like: Node) -> Node:
    """Register `value` as the buffer `target` (its owner module made if missing) and return a get_attr
    node for it, inserted at the current insertion point, with a fake value in `like`'s fake mode."""
    owner_name, _, leaf = target.rpartition(".")
    owner = gm
    for part in owner_name.split(".") if owner_name else []:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if not hasattr(owner, leaf):
        owner.register_buffer(leaf, value)
    node = gm.graph.get_attr(target)
    fake = fake_value(like)
    mode = getattr(fake, "fake_mode", None)
    node.meta["val"] = mode.from_tensor(value, static_shapes=True) if mode is not None else None
    return node


def derived_weights(
    gm: GraphModule, source: Node, suffixes: Sequence[str], make: Callable[[], dict[str, torch.Tensor]]
) -> list[Node]:
    """get_attr nodes, at the insertion point, for tensors derived from the attribute that the get_attr
    `source` reads, named its target plus `_<suffix>`: made by `make` (suffix -> tensor) once; another
    node or a later program of the same weights finds them made."""
    target = str(source.target)
    owner_name, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_name)
    if all(hasattr(owner, f"{leaf}_{suffix}") for suffix in suffixes):
        tensors = {suffix: getattr(owner, f"{leaf}_{suffix}") for suffix in suffixes}
    else:
        tensors = make()
    return [add_weight(gm, f"{target}_{suffix}", tensors[suffix], source) for suffix in suffixes]


def drop_attr(gm: GraphModule, node: Node) -> None:
    """Erase a get_attr node nothing reads any more, and its attribute when no other node names it,
    with every other name of the same tensor that no node reads (a tied embedding's second name):
    the artifact saves each name it finds."""
    if node.users:
        return
    gm.graph.erase_node(node)
    if gm.graph.find_nodes(op="get_attr", target=node.target):
        return
    owner_name, _, leaf = str(node.target).rpartition(".")
    tensor = getattr(gm.get_submodule(owner_name), leaf)
    read = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    for name in (attr_names(gm, tensor) - read) | {str(node.target)}:
        owner_name, _, leaf = name.rpartition(".")
        delattr(gm.get_submodule(owner_name), leaf)


def attr_names(gm: GraphModule, tensor: torch.Tensor) -> set[str]:
    """Every parameter or buffer name under which `gm` holds `tensor` (a tied weight has several)."""
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    return {name for name, value in named if value is tensor}


def common_parent(weights: list[Node]) -> str | None:
    """The module holding the layers whose weights these are (`a.mlp` of `a.mlp.gate_proj.weight`; ""
    for the root), if every one is an attribute and they share it."""
    if any(not isinstance(w, Node) or w.op != "get_attr" for w in weights):
        return None
    parents = {str(w.target).rpartition(".")[0].rpartition(".")[0] for w in weights}
    return parents.pop() if len(parents) == 1 else None


def join_target(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def same_2d_floats(tensors: list[torch.Tensor] | None) -> bool:
    """True when every tensor is a 2-D floating tensor with the first one's input features and dtype."""
    if not tensors:
        return False
    first = tensors[0]
    return all(
        t.dim() == 2 and t.is_floating_point() and t.shape[1] == first.shape[1] and t.dtype == first.dtype
        for t in tensors
    )
