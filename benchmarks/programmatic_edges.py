"""Experiment: turn a captured CUDA graph's edges into programmatic ones (programmatic dependent launch)
wherever the kernel at the edge's end waits for its predecessor before it touches memory.

Why: in a decode step every kernel waits for the previous one to end, drain and flush before its own
launch starts, about a microsecond per kernel and 300 kernels per step of llama-8b. Our CUDA C++ linears
are launched as programmatic dependents already (their launch overlaps the Triton kernel before them),
but AOTInductor launches Triton kernels with a plain cuLaunchKernel, so the edges into them stay plain.
A graph edge can be made programmatic after capture (CUDA 12.3+: cuGraphAddDependencies_v2 with edge
data); it is safe only where the kernel at its end executes `griddepcontrol.wait` before it reads or
writes anything the predecessor may touch. The kernel names that do must be given: nothing here can
see inside a kernel.

This is a benchmark-side experiment (bench_linear_chain.py --programmatic-edges), through the CUDA
driver's C API by ctypes; the executor does not use it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable

CU_GRAPH_NODE_TYPE_KERNEL = 0
CU_GRAPH_DEPENDENCY_TYPE_DEFAULT = 0
CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC = 1
CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC = 1


class EdgeData(ctypes.Structure):
    """CUgraphEdgeData."""

    _fields_ = [
        ("from_port", ctypes.c_ubyte),
        ("to_port", ctypes.c_ubyte),
        ("type", ctypes.c_ubyte),
        ("reserved", ctypes.c_ubyte * 5),
    ]


class KernelNodeParams(ctypes.Structure):
    """CUDA_KERNEL_NODE_PARAMS_v2."""

    _fields_ = [
        ("func", ctypes.c_void_p),
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("kernelParams", ctypes.c_void_p),
        ("extra", ctypes.c_void_p),
        ("kern", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p),
    ]


def select_edges(
    edges: Iterable[tuple[int, int, int]], kernel_name: Callable[[int], str | None], waiting: Iterable[str]
) -> list[tuple[int, int]]:
    """The (from, to) edges to make programmatic: default edges between two kernel nodes whose end's
    kernel name is one of `waiting`. edges: (from, to, dependency type); kernel_name: a node's kernel
    name, None for a node that is not a kernel."""
    waiting = set(waiting)
    chosen = []
    for src, dst, kind in edges:
        if kind != CU_GRAPH_DEPENDENCY_TYPE_DEFAULT:
            continue
        if kernel_name(src) is None or kernel_name(dst) not in waiting:
            continue
        chosen.append((src, dst))
    return chosen


class _Driver:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")

    def check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} failed with CUresult {result}")

    def edges(self, graph: int) -> list[tuple[int, int, int]]:
        count = ctypes.c_size_t(0)
        get = self.lib.cuGraphGetEdges_v2
        self.check(get(ctypes.c_void_p(graph), None, None, None, ctypes.byref(count)), "cuGraphGetEdges_v2")
        n = count.value
        src, dst, data = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(), (EdgeData * n)()
        self.check(get(ctypes.c_void_p(graph), src, dst, data, ctypes.byref(count)), "cuGraphGetEdges_v2")
        return [(src[i] or 0, dst[i] or 0, data[i].type) for i in range(count.value)]

    def kernel_name(self, node: int) -> str | None:
        kind = ctypes.c_int(-1)
        self.check(self.lib.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)), "cuGraphNodeGetType")
        if kind.value != CU_GRAPH_NODE_TYPE_KERNEL:
            return None
        params = KernelNodeParams()
        get = self.lib.cuGraphKernelNodeGetParams_v2
        self.check(get(ctypes.c_void_p(node), ctypes.byref(params)), "cuGraphKernelNodeGetParams_v2")
        name = ctypes.c_char_p()
        if params.func and self.lib.cuFuncGetName(ctypes.byref(name), ctypes.c_void_p(params.func)) == 0:
            return (name.value or b"").decode()
        if params.kern and self.lib.cuKernelGetName(ctypes.byref(name), ctypes.c_void_p(params.kern)) == 0:
            return (name.value or b"").decode()
        return ""  # a kernel whose name the driver does not give: never an edge's end here

    def make_programmatic(self, graph: int, edges: list[tuple[int, int]]) -> None:
        for src, dst in edges:
            old = EdgeData()
            new = EdgeData(from_port=CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC, type=CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC)
            a, b = (ctypes.c_void_p * 1)(src), (ctypes.c_void_p * 1)(dst)
            g = ctypes.c_void_p(graph)
            self.check(self.lib.cuGraphRemoveDependencies_v2(g, a, b, ctypes.byref(old), 1), "remove dependency")
            self.check(self.lib.cuGraphAddDependencies_v2(g, a, b, ctypes.byref(new), 1), "add dependency")


def make_edges_programmatic(graph: int, waiting: Iterable[str]) -> tuple[int, int]:
    """Rewrite the captured graph (a cudaGraph_t as an int) in place; returns (edges made
    programmatic, edges in all)."""
    driver = _Driver()
    edges = driver.edges(graph)
    names: dict[int, str | None] = {}

    def name(node: int) -> str | None:
        if node not in names:
            names[node] = driver.kernel_name(node)
        return names[node]

    chosen = select_edges(edges, name, waiting)
    driver.make_programmatic(graph, chosen)
    return len(chosen), len(edges)
