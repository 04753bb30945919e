"""Eager: the transformed graphs run op by op, without compiling. For debugging passes and ops.

Each program is saved as an ExportedProgram whose weights are left out (they are on the meta device
in the .pt2 file); load puts the artifact's weights back in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from oiv2compile import _torch_compat
from oiv2compile.capture import CapturedProgram, export_transformed
from oiv2compile.config import BuildConfig
from oiv2compile.errors import ArtifactError


def check(cfg: BuildConfig) -> None:
    """Every configuration builds: nothing to refuse before the work starts."""


def lower(program: CapturedProgram, out_dir: Path, cfg: BuildConfig) -> dict[str, Any]:
    name = f"{program.program.name}.pt2"
    exported = export_transformed(program)
    torch.export.save(_torch_compat.without_weights(exported), out_dir / name)
    return {"file": name, "backend": "eager"}


def load(artifact_dir: Path, entry: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    exported = torch.export.load(artifact_dir / entry["file"])
    module = _torch_compat.unlift(exported)
    for node in module.graph.find_nodes(op="get_attr"):
        name = node.target
        if not isinstance(_get(module, name), torch.Tensor):
            continue  # a submodule, such as a higher-order op's body
        if name not in weights:
            raise ArtifactError(
                f"{artifact_dir} lacks weights that {entry['file']} needs (first: {name}); rebuild the artifact."
            )
        _assign(module, name, weights[name])
    return module


def _get(module: torch.nn.Module, name: str) -> Any:
    owner_name, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner_name), leaf)


def _assign(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)
