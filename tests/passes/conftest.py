"""A capture of each tiny preset's programs, made once per session; each test gets its own copy."""

from __future__ import annotations

import pytest

from tests.passes.helpers import captured, snapshot


@pytest.fixture(scope="session")
def tiny_program():  # type: ignore[no-untyped-def]
    """tiny_program(preset, program) -> (a fresh copy of the captured graph, its CacheSpec)."""
    cache = {}

    def get(preset, program):  # type: ignore[no-untyped-def]
        key = (preset, program.name)
        if key not in cache:
            prog, spec = captured(preset, program)
            cache[key] = (prog.graph_module, spec)
        gm, spec = cache[key]
        return snapshot(gm), spec

    return get
