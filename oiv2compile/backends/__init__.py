"""Lowering targets. Each backend module has `check(cfg)` (raises a user error, before the build
starts, for what it cannot build), `lower(program, out_dir, cfg) -> entry` and
`load(artifact_dir, entry, weights) -> program callable`; `entry` is what the manifest records.

A loaded program is called as program(input_ids, positions, slots, last_index, caches) -> logits.
"""

from __future__ import annotations

from types import ModuleType

from oiv2compile.config import Backend


def get_backend(backend: Backend) -> ModuleType:
    if backend is Backend.INDUCTOR:
        from oiv2compile.backends import inductor

        return inductor
    if backend is Backend.EAGER:
        from oiv2compile.backends import eager

        return eager
    if backend is Backend.ONNX:
        from oiv2compile.backends import onnx

        return onnx
    raise ValueError(f"no backend {backend!r}")
