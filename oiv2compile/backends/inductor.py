"""AOTInductor: each program is compiled ahead of time into a .pt2 package without its weights.

The weights stay in the artifact's safetensors; at load both packages point at the same device
tensors (user-managed constants), so the prefill and decode programs share one copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from oiv2compile import _torch_compat
from oiv2compile.capture import CapturedProgram, Phase, ProgramSpec, export_transformed
from oiv2compile.config import BuildConfig, Device
from oiv2compile.errors import ArtifactError
from oiv2compile.kernels import _cuda_extension
from oiv2compile.passes.use_cuda_kernels import libraries as kernel_libraries


def inductor_configs(cfg: BuildConfig, program: ProgramSpec) -> dict[str, Any]:
    """Patched for this compile only (passed to AOTInductor, never set globally); the manifest
    records them per program."""
    configs: dict[str, Any] = {"aot_inductor.package_constants_in_so": False}
    if cfg.device is Device.CUDA and program.phase is Phase.DECODE:
        # Tunes the generated reductions, among them the matrix-vector products that a batch of
        # one turns each linear into. Prefill's matrix products go to cuBLAS: tuning there only
        # costs build time.
        configs["coordinate_descent_tuning"] = True
    return configs


def check(cfg: BuildConfig) -> None:
    """Every configuration builds: nothing to refuse before the work starts."""


def lower(program: CapturedProgram, out_dir: Path, cfg: BuildConfig) -> dict[str, Any]:
    name = f"{program.program.name}.pt2"
    exported = export_transformed(program)
    configs = inductor_configs(cfg, program.program)
    _torch_compat.aoti_compile_and_package(exported, out_dir / name, configs)
    # The C++ kernels the program calls (use_cuda_kernels) travel with it, built for this card.
    libraries = kernel_libraries(program.graph_module)
    for library in libraries:
        shutil.copy2(library, out_dir / library.name)
    return {
        "file": name,
        "backend": "inductor",
        "inductor_configs": configs,
        "libraries": [library.name for library in libraries],
    }


def load(artifact_dir: Path, entry: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    for library in entry.get("libraries", []):  # their kernels register before the program runs
        _cuda_extension.load_library(artifact_dir / library)
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
