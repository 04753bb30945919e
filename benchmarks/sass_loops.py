"""The hand-written CUDA kernels read without a GPU: registers, spills and the innermost tensor-core loop.

Compiles a source of `oiv2compile/kernels/csrc/` for sm_90a with nvcc (as `_cuda_extension.py` does:
-O3 --use_fast_math), disassembles it with cuobjdump (it needs nvdisasm beside it or on PATH; where
the CUDA toolkit lacks them, PyPI's `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels hold
both), and prints for each kernel whose name has --kernel: its registers and spill bytes (ptxas), its
instructions, and the shortest loop (a backward branch) that holds a tensor-core instruction (HMMA,
IMMA, HGMMA): its length in instructions and how many of them read a special register (S2R) or touch
local memory (LDL, STL). With --against, the same figures for a second copy of the source, side by side,
so a change's effect on the hot loop shows before any device time is spent on it.

    python benchmarks/sass_loops.py oiv2compile/kernels/csrc/linear_int4_mma.cu --kernel streamed \\
        --against /tmp/variant/linear_int4_mma.cu

The handle types that ATen's CUDAContext.h takes from the cuBLAS/cuSPARSE/cuSOLVER headers are always
declared in a scratch folder (searched before the toolkit's own, so a minimal nvcc install and the CPU
build of torch will do): the object is only disassembled, never linked or run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "oiv2compile" / "kernels" / "csrc"
# Declarations that ATen/cuda/CUDAContext.h needs from toolkit headers a minimal nvcc install lacks.
STUB_HEADERS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}
TENSOR_CORE = ("HMMA", "IMMA", "HGMMA", "IGMMA")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACK_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`?\(?)0x([0-9a-f]+)")


@dataclass(frozen=True)
class KernelFigures:
    registers: int | None
    spill_stores: int
    spill_loads: int
    instructions: int
    loop: int | None  # instructions of the shortest loop holding a tensor-core instruction
    loop_special: int  # of those, S2R, LDL and STL


def parse_ptxas(log: str) -> dict[str, tuple[int | None, int, int]]:
    """Mangled kernel name -> (registers, spill store bytes, spill load bytes), from `-Xptxas -v`."""
    out: dict[str, tuple[int | None, int, int]] = {}
    name = None
    spills = (0, 0)
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name, spills = m.group(1), (0, 0)
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills = (int(m.group(1)), int(m.group(2)))
            out[name] = (None, *spills)
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            out[name] = (int(m.group(1)), *spills)
    return out


def split_functions(sass: str) -> dict[str, str]:
    """Mangled kernel name -> its disassembly, from `cuobjdump -sass`."""
    parts = re.split(r"\n\s*Function : (\S+)\n", "\n" + sass)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def hot_loop(body: str) -> tuple[int, int, int | None, int]:
    """(instructions, tensor-core instructions, the shortest loop holding one, its S2R/LDL/STL)."""
    code = [(int(a, 16), text) for a, text in _INSTRUCTION.findall(body)]
    if not code:
        return 0, 0, None, 0
    step = code[1][0] - code[0][0] if len(code) > 1 else 16
    mma = [a for a, text in code if any(op in text for op in TENSOR_CORE)]
    best: tuple[int, int, int] | None = None
    for at, text in code:
        m = _BACK_BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < at and any(target <= a <= at for a in mma):
            length = (at - target) // step + 1
            if best is None or length < best[0]:
                best = (length, target, at)
    if best is None:
        return len(code), len(mma), None, 0
    special = sum(
        1 for a, text in code if best[1] <= a <= best[2] and re.search(r"\b(S2R|LDL|STL)\b", text) is not None
    )
    return len(code), len(mma), best[0], special


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def figures(ptxas_log: str, sass: str) -> dict[str, KernelFigures]:
    """Demangled kernel name -> its figures."""
    regs = parse_ptxas(ptxas_log)
    functions = split_functions(sass)
    names = demangle(sorted(set(regs) | set(functions)))
    out = {}
    for mangled, pretty in names.items():
        registers, stores, loads = regs.get(mangled, (None, 0, 0))
        count, _mma, loop, special = hot_loop(functions.get(mangled, ""))
        out[pretty] = KernelFigures(registers, stores, loads, count, loop, special)
    return out


def compile_and_disassemble(source: Path, scratch: Path) -> tuple[str, str]:
    """(ptxas log, SASS) of `source` built for sm_90a."""
    import torch.utils.cpp_extension as cpp

    stubs = scratch / "stubs"
    for name, text in STUB_HEADERS.items():
        (stubs / name).parent.mkdir(parents=True, exist_ok=True)
        (stubs / name).write_text(text)
    # A copy named .cu (a variant may be kept as .cu.txt); its headers are found beside the original.
    copy = scratch / "source.cu"
    shutil.copyfile(source, copy)
    obj = scratch / "source.o"
    includes = [*cpp.include_paths(), sysconfig.get_paths()["include"], str(source.parent), str(CSRC), str(stubs)]
    cmd = [
        "nvcc", "-std=c++17", "-O3", "--use_fast_math", "-gencode", "arch=compute_90a,code=sm_90a",
        "-Xptxas", "-v", "-c", str(copy), "-o", str(obj), "-D_GLIBCXX_USE_CXX11_ABI=1",
        *(f"-I{path}" for path in includes),
    ]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{built.stderr[-4000:]}")
    sass = subprocess.run(["cuobjdump", "-sass", str(obj)], capture_output=True, text=True)
    if sass.returncode != 0 or "Function :" not in sass.stdout:
        raise RuntimeError(f"cuobjdump gave no SASS for {obj}: {(sass.stderr or sass.stdout)[-400:]}")
    return built.stderr + built.stdout, sass.stdout


def short_name(name: str) -> str:
    """A demangled kernel name without `void`, anonymous namespaces and its parameter list."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # the parenthesis that opens the final parameter list
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0 and name[i] == "(":
            return name[:i]
    return name


def _cell(f: KernelFigures | None) -> str:
    if f is None:
        return "-"
    loop = "no loop" if f.loop is None else f"{f.loop}" + (f" ({f.loop_special} S2R/LDL/STL)" if f.loop_special else "")
    return f"{f.registers} regs, spills {f.spill_stores}/{f.spill_loads}, {f.instructions} instr, loop {loop}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path)
    p.add_argument("--against", type=Path, help="a second copy of the source, shown beside the first")
    p.add_argument("--kernel", default="", help="only kernels whose demangled name has this")
    args = p.parse_args()
    for tool in ("nvcc", "cuobjdump"):
        if shutil.which(tool) is None:
            print(
                f"{tool} is not on PATH (cuobjdump and nvdisasm: pip download nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
            )
            return 2
    sources = [args.source] + ([args.against] if args.against else [])
    with tempfile.TemporaryDirectory() as tmp:
        scratches = [Path(tmp) / str(i) for i in range(len(sources))]
        for scratch in scratches:
            scratch.mkdir()
        try:  # the two compiles at once
            with ThreadPoolExecutor(len(sources)) as pool:
                built = list(pool.map(compile_and_disassemble, [s.resolve() for s in sources], scratches))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    tables = [figures(*b) for b in built]
    names = sorted(n for n in set().union(*tables) if args.kernel in n)
    print(" | ".join(["kernel", *map(str, sources)]))
    for name in names:
        print(" | ".join([short_name(name), *(_cell(t.get(name)) for t in tables)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
