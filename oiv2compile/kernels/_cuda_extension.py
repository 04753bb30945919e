"""Compiling and loading the hand-written CUDA C++ kernels (csrc/): once per source and torch build,
with nvcc, about a minute the first time and cached after. Each library registers its op's CUDA
kernel (TORCH_LIBRARY_IMPL) when it loads."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
# File names (unique per source and torch build) of the libraries loaded in this process: loading a
# second copy of one (from an artifact, say) would register its kernels twice.
_LOADED: set[str] = set()


def extension_name(source: Path) -> str:
    """A name that changes with the source, the headers beside it and the torch build, so a stale
    library is never reused."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in (source, *sorted(CSRC.glob("*.cuh"))):
        digest.update(path.read_bytes())
    return f"oiv2_{source.stem}_{digest.hexdigest()[:12]}"


def load(source: Path, build_dir: Path | None = None) -> Path:
    """Compile `source` for this GPU (unless already built) and load it; returns the library."""
    from torch.utils import cpp_extension

    name = extension_name(source)
    build_dir = build_dir or Path(os.environ.get("OIV2_EXTENSIONS_DIR", Path.home() / ".cache" / "oiv2compile" / "ext"))
    target = build_dir / name
    target.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    if f"{name}.so" in _LOADED:
        return target / f"{name}.so"
    with _building(target):
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cuda_cflags=["-O3", "--use_fast_math"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(target),
            is_python_module=False,
            verbose=False,
        )
    _LOADED.add(f"{name}.so")
    return target / f"{name}.so"


@contextlib.contextmanager
def _building(target: Path) -> Iterator[None]:
    """One process at a time builds or loads the library in `target`, under a lock the system lets go
    of when its holder dies. torch's own lock is a file that a build killed midway (Ctrl-C, a timeout)
    leaves behind, and every later load then waits for it forever: holding ours, no build of ours can be
    running, so such a file is stale and goes."""
    with open(target / "oiv2-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # let go of when the file closes
        (target / "lock").unlink(missing_ok=True)
        yield


def load_library(path: Path) -> None:
    """Load a library that `load` built (an artifact's copy), unless one of that name is loaded."""
    if path.name not in _LOADED:
        torch.ops.load_library(str(path))
        _LOADED.add(path.name)
