"""The one module that touches PyTorch's private or version-dependent APIs.

oiv2compile supports torch 2.11 through 2.14. When a torch upgrade moves one of these, this file
changes and nothing else does.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def unlift(exported: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The exported program as a plain GraphModule (weights as attributes), without the input-guard
    submodule that torch >= 2.12 inserts: the passes and a second export do not want it."""
    if "check_guards" in inspect.signature(exported.module).parameters:
        return exported.module(check_guards=False)
    return exported.module()


def aoti_compile_and_package(
    exported: torch.export.ExportedProgram, package_path: Path, inductor_configs: dict[str, Any]
) -> Path:
    from torch._inductor import aoti_compile_and_package as compile_and_package

    with warnings.catch_warnings(), _fresh_int_array_declarations():
        # torch pickles its own tree specs with a deprecated check (torch 2.13); nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)
        path = compile_and_package(exported, package_path=str(package_path), inductor_configs=inductor_configs)
    return Path(path)


@contextlib.contextmanager
def _fresh_int_array_declarations() -> Iterator[None]:
    """Make AOTInductor's C++ wrapper declare every size/stride array where it is used.

    torch 2.11's wrapper caches these declarations by (array text, id of the output buffer's owner):
    building llama-8b's decode program on an H100 produced a wrapper.cpp that used `int_array_38`
    where it was never declared (C++ compile error, 2026-11-27), a cache entry pointing at a
    declaration that is not in scope there. A fresh declaration per use costs a few lines of C++.
    """
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    except ImportError:
        yield
        return
    cached = getattr(CppWrapperCpu, "codegen_int_array_var", None)
    impl: Any = getattr(CppWrapperCpu, "_codegen_int_array_var_impl", None)
    wrapped: Any = getattr(cached, "__wrapped__", None)  # releases that cache with functools.cache
    if cached is None or (impl is None and wrapped is None):
        yield
        return

    def declare_here(
        self: Any, int_array: str, writeline: Any, known_statically: bool = False, graph: Any = None
    ) -> str:
        if impl is not None:
            return impl(self, int_array, writeline, known_statically)
        return wrapped(self, int_array, writeline, known_statically, graph)

    CppWrapperCpu.codegen_int_array_var = declare_here  # type: ignore[method-assign]
    try:
        yield
    finally:
        CppWrapperCpu.codegen_int_array_var = cached  # type: ignore[method-assign]


def aoti_load_package(package_path: Path) -> Any:
    """Load an AOTInductor package. Single-threaded runners can be captured in CUDA graphs.

    The runner is made directly: torch's load_package first probes the host CPU's vector ISA by
    compiling test programs (41 s seen on a fresh H100 machine) only to log a warning on a mismatch;
    the manifest check (runtime.artifact.check_compatible) covers compatibility instead.
    """
    from torch._inductor.package import package as aoti_package

    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    compiled_model = getattr(aoti_package, "AOTICompiledModel", None)
    if loader is None or compiled_model is None:
        return aoti_package.load_package(str(package_path), run_single_threaded=True)
    # (path, model name inside the package, run_single_threaded, num_runners, device index)
    return compiled_model(loader(str(package_path), "model", True, 1, -1))


def host_cpu_isas() -> list[str]:
    """The CPU vector instruction sets Inductor can compile for on this host, best first (probes by
    compiling small programs once per process; cached on disk by Inductor)."""
    from torch._inductor import cpu_vec_isa

    return [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]


def match_subgraphs(pattern: torch.fx.Graph, graph: torch.fx.Graph) -> list[Any]:
    """torch.fx's subgraph matcher (not covered by torch's backward-compatibility promise): every
    self-contained match of `pattern` in `graph`, overlapping ones included. Pattern placeholders are
    wildcards that also match literals; each match's `nodes_map` maps pattern nodes to graph nodes
    or literals, and `returning_nodes` are the graph nodes behind the pattern's outputs."""
    from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

    return SubgraphMatcher(pattern, remove_overlapping_matches=False).match(graph)


def without_weights(exported: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The same program with every weight and constant tensor on the meta device, for saving a graph
    whose weights live elsewhere (the artifact's safetensors)."""
    from torch.export import ExportedProgram

    def meta(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        out = torch.empty_like(t, device="meta")
        return torch.nn.Parameter(out, requires_grad=False) if isinstance(t, torch.nn.Parameter) else out

    return ExportedProgram(
        root=exported.graph_module,
        graph=exported.graph,
        graph_signature=exported.graph_signature,
        state_dict={k: meta(v) for k, v in exported.state_dict.items()},
        range_constraints=exported.range_constraints,
        module_call_graph=exported.module_call_graph,
        example_inputs=None,
        constants={k: meta(v) for k, v in exported.constants.items()},
        verifiers=[exported.verifier],
    )


def release_export_state() -> None:
    """Drop what torch.export keeps in module globals after a trace. torch 2.13 keeps the last
    export's FX nodes in a dict of proxy_tensor, and through them the traced module and its weights:
    after building an 8B model that is 16 GB of GPU memory that nothing else frees."""
    from torch.fx.experimental import proxy_tensor

    leftover = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(leftover, dict):
        leftover.clear()
