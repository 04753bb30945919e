"""AOTInductor: each program is compiled ahead of time into a .pt2 package without its weights.

The weights stay in the artifact's safetensors; at load both packages point at the same device
tensors (user-managed constants), so the prefill and decode programs share one copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from oiv2compile import _torch_compat
from oiv2compile.capture import CapturedProgram, export_transformed
from oiv2compile.errors import ArtifactError

# Patched for this compile only (passed to AOTInductor, never set globally) and recorded in the
# manifest.
INDUCTOR_CONFIGS: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
}


def lower(program: CapturedProgram, out_dir: Path) -> dict[str, Any]:
    name = f"{program.phase.value}.pt2"
    exported = export_transformed(program)
    _torch_compat.aoti_compile_and_package(exported, out_dir / name, INDUCTOR_CONFIGS)
    return {"file": name, "backend": "inductor", "inductor_configs": INDUCTOR_CONFIGS}


def load(artifact_dir: Path, entry: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    runner = _torch_compat.aoti_load_package(artifact_dir / entry["file"])
    names = runner.get_constant_fqns()
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ArtifactError(
            f"{artifact_dir} lacks weights that {entry['file']} needs (first: {missing[0]}); rebuild the artifact."
        )
    # user_managed: the runner uses these tensors as they are, with no copy of its own.
    runner.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
    return runner
