"""The artifact on disk: a directory with manifest.json, weights in safetensors, one program file per
phase, and the tokenizer when there is one.

The manifest records the format version, the versions and device it was built with, the model and
build configs, the pass report and the sha256 of every other file. `check_compatible` and
`verify_files` run before any compiled library is loaded. A build writes into a staging directory
next to the output and renames it into place at the end, so a failed or interrupted build leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from oiv2compile.errors import ArtifactError, BuildError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 2 << 30  # shards hash in parallel at load


# ---- building ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def staging_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A fresh directory beside `out` that becomes `out` only if the block finishes."""
    out = out.absolute()
    if out.exists() and not overwrite:
        raise BuildError(f"{out} already exists; choose another output or pass --force to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:  # KeyboardInterrupt too: never leave a half artifact
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_weights(named: dict[str, torch.Tensor], out_dir: Path) -> dict[str, Any]:
    """Write each distinct tensor once, in shards; names that share a tensor (tied embeddings) become aliases."""
    from safetensors.torch import save_file

    canonical: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    unique: dict[str, torch.Tensor] = {}
    for name in sorted(named):
        tensor = named[name]
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key in canonical:
            aliases[name] = canonical[key]
        else:
            canonical[key] = name
            unique[name] = tensor
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in unique.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    files = []
    for i, shard in enumerate(shards):
        file = f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file))
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in unique.values())
    return {"files": files, "aliases": aliases, "bytes": total, "tensors": len(unique)}


def file_digests(root: Path, files: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 2), max(1, len(files)))) as pool:
        return dict(zip(files, pool.map(lambda f: _sha256(root / f), files), strict=True))


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "files": file_digests(root, files)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# ---- loading ----------------------------------------------------------------------------------------


def read_manifest(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise ArtifactError(f"{root} does not exist; build an artifact there first with `oiv2compile build`.")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}; it is not an oiv2compile artifact.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path} is not valid JSON; the artifact is damaged, rebuild it.") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ArtifactError(f"{path} has no format_version; it is not an oiv2compile manifest.")
    return manifest


def check_compatible(manifest: dict[str, Any], device: torch.device) -> None:
    """Refuse an artifact this installation cannot run, before anything is loaded."""
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"The artifact has format version {version}, newer than this oiv2compile reads ({FORMAT_VERSION}); "
            "upgrade oiv2compile."
        )
    built_torch = manifest.get("torch_version")
    if built_torch != torch.__version__:
        raise ArtifactError(
            f"The artifact was built with torch {built_torch} but this is torch {torch.__version__}; "
            "rebuild it with this torch."
        )
    built = manifest.get("device", {})
    if built.get("type") != device.type:
        raise ArtifactError(
            f"The artifact was built for {built.get('type')} and cannot run on {device.type}; "
            f"rebuild it with --device {device.type}."
        )
    if device.type == "cpu" and built.get("cpu_isa") not in (None, "none"):
        from oiv2compile import _torch_compat

        if built["cpu_isa"] not in _torch_compat.host_cpu_isas():
            raise ArtifactError(
                f"The artifact's CPU code was compiled for {built['cpu_isa']}, which this CPU lacks; rebuild it here."
            )
    quantization = manifest.get("quantization") or {}
    layouts = [name.strip() for name in str(quantization.get("layout") or "").split(",") if name.strip()]
    unknown = sorted(set(layouts) - weight_layouts())
    if unknown:
        raise ArtifactError(
            f"The artifact's weights are in layout {', '.join(unknown)}, which this oiv2compile no longer reads; "
            "rebuild it."
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError("The artifact was built for CUDA but no GPU is visible here.")
        capability = list(torch.cuda.get_device_capability(device))
        if built.get("capability") != capability:
            name = torch.cuda.get_device_name(device)
            raise ArtifactError(
                f"The artifact was built for compute capability {_cap(built.get('capability'))} "
                f"({built.get('name')}) but this GPU is {_cap(capability)} ({name}); rebuild it on this GPU."
            )


def weight_layouts() -> set[str]:
    """The quantized weight layouts this oiv2compile's kernels read (a manifest's quantization.layout)."""
    from oiv2compile.kernels.linear_int4 import LAYOUT as INT4
    from oiv2compile.kernels.linear_int4_mma import LAYOUT as INT4_MMA
    from oiv2compile.kernels.linear_int8 import LAYOUT as INT8
    from oiv2compile.kernels.linear_int8 import PAIRED_TILES_LAYOUT, TILES_LAYOUT

    return {INT8, TILES_LAYOUT, PAIRED_TILES_LAYOUT, INT4, INT4_MMA}


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    expected: dict[str, str] = manifest.get("files", {})
    for name in expected:
        if not (root / name).is_file():
            raise ArtifactError(f"{root / name} is missing; the artifact is incomplete, rebuild it.")
    actual = file_digests(root, list(expected))
    for name, digest in expected.items():
        if actual[name] != digest:
            raise ArtifactError(
                f"{root / name} changed after the build (sha256 mismatch); restore it or rebuild the artifact."
            )


def load_weights(root: Path, index: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    target = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    for file in index["files"]:
        weights.update(load_file(str(root / file), device=target))
    for alias, name in index["aliases"].items():
        weights[alias] = weights[name]
    return weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _cap(capability: Any) -> str:
    return ".".join(str(c) for c in capability) if capability else "unknown"
