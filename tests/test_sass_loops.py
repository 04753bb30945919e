"""benchmarks/sass_loops.py: the parsing of ptxas's log and of cuobjdump's SASS, and (where nvcc and
cuobjdump are on PATH) a real kernel's hot loop."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sass_loops.py"
spec = importlib.util.spec_from_file_location("sass_loops", SCRIPT)
assert spec and spec.loader
sass_loops = importlib.util.module_from_spec(spec)
sys.modules["sass_loops"] = sass_loops  # its dataclass looks its module up
spec.loader.exec_module(sass_loops)

PTXAS = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 8 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers
"""

SASS = """
	code for sm_90a
		Function : _Z3fooPf
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x0000 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000 */
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;  /* 0x0000 */
        /*0030*/                   S2R R2, SR_TID.X ;                     /* 0x0000 */
        /*0040*/                   STL [R1], R2 ;                         /* 0x0000 */
        /*0050*/               @P0 BRA 0x20 ;                             /* 0x0000 */
        /*0060*/                   IADD3 R3, R3, 0x1, RZ ;                /* 0x0000 */
        /*0070*/               @P1 BRA 0x0 ;                              /* 0x0000 */
        /*0080*/                   EXIT ;                                 /* 0x0000 */
		..........
		Function : _Z3barv
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x0000 */
        /*0010*/               @P0 BRA 0x0 ;                              /* 0x0000 */
        /*0020*/                   EXIT ;                                 /* 0x0000 */
"""


def test_ptxas_log_gives_registers_and_spills_per_kernel():
    assert sass_loops.parse_ptxas(PTXAS) == {"_Z3fooPf": (56, 8, 20), "_Z3barv": (12, 0, 0)}


def test_the_shortest_loop_holding_a_tensor_core_instruction_and_its_special_reads():
    functions = sass_loops.split_functions(SASS)
    assert sorted(functions) == ["_Z3barv", "_Z3fooPf"]
    # Two loops hold the HMMA (0x20-0x50 and 0x00-0x70): the shorter is taken, 4 instructions, of which
    # one S2R and one STL.
    assert sass_loops.hot_loop(functions["_Z3fooPf"]) == (9, 1, 4, 2)
    # A loop without a tensor-core instruction is not a hot loop.
    assert sass_loops.hot_loop(functions["_Z3barv"]) == (3, 0, None, 0)
    table = sass_loops.figures(PTXAS, SASS)
    foo = next(f for name, f in table.items() if name.startswith("foo"))
    assert foo == sass_loops.KernelFigures(56, 8, 20, 9, 4, 2)


def test_short_names_drop_void_namespaces_and_parameters():
    name = (
        "void (anonymous namespace)::k<__nv_bfloat16, 7, ((anonymous namespace)::Epilogue)0, false>"
        "(__nv_bfloat16 const*, int)"
    )
    assert sass_loops.short_name(name) == "k<__nv_bfloat16, 7, (Epilogue)0, false>"


KERNEL = r"""
#include <cstdint>
__global__ void mma_loop(const uint32_t* a, const uint32_t* b, float* out, int n) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < n; ++i) {
    const uint32_t a0 = a[i * 4 + threadIdx.x % 4], b0 = b[i * 2 + threadIdx.x % 2];
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%4,%4,%4}, {%5,%5}, "
                 "{%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(b0));
  }
  out[threadIdx.x] = d[0] + d[1] + d[2] + d[3];
}
"""


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cuobjdump")), reason="needs nvcc and cuobjdump")
def test_a_compiled_kernel_shows_its_mma_loop(tmp_path):
    source = tmp_path / "mma_loop.cu"
    source.write_text(KERNEL)
    table = sass_loops.figures(*sass_loops.compile_and_disassemble(source, tmp_path))
    (figures,) = (f for name, f in table.items() if name.startswith("mma_loop"))
    assert figures.registers and figures.spill_stores == 0
    assert figures.loop is not None and 3 < figures.loop < figures.instructions
