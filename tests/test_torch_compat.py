"""The adapter's workaround for AOTInductor's cached size/stride declarations."""

from __future__ import annotations

from itertools import count

import pytest

from oiv2compile import _torch_compat

cpp_wrapper_cpu = pytest.importorskip("torch._inductor.codegen.cpp_wrapper_cpu")


def _bare_wrapper():  # type: ignore[no-untyped-def]
    wrapper = object.__new__(cpp_wrapper_cpu.CppWrapperCpu)
    wrapper.int_array_id = count()
    wrapper.declared_int_array_vars = set()
    wrapper.codegen_int_array_var_cache = {}
    return wrapper


def test_each_use_declares_its_own_array_and_the_cache_comes_back():
    original = cpp_wrapper_cpu.CppWrapperCpu.codegen_int_array_var
    wrapper, lines = _bare_wrapper(), []
    with _torch_compat._fresh_int_array_declarations():
        first = wrapper.codegen_int_array_var("{s0, 32L, 1L, 128L}", lines.append)
        second = wrapper.codegen_int_array_var("{s0, 32L, 1L, 128L}", lines.append)
    assert first != second
    assert [line.split("[]")[0].split()[-1] for line in lines] == [first, second]  # declared where used
    assert cpp_wrapper_cpu.CppWrapperCpu.codegen_int_array_var is original
    cached = [wrapper.codegen_int_array_var("{s1, 8L}", lines.append) for _ in range(2)]
    assert cached[0] == cached[1]  # torch's own behaviour outside the builds
