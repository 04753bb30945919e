"""Variants of a kernel's source, each timed by bench_linear_chain.py in the same run.

Each variant is a copy of the `oiv2compile` package with one or more regular-expression substitutions
applied to its files; every one must match at least once, or the run stops before anything is timed.
The unchanged tree runs as `base`. The variants' kernel libraries compile in parallel (each source
gets its own library name, kernels/_cuda_extension.py), then the chain runs once per variant per
round, in the order base, A, B, ..., base, A, B, ..., so that a drift of the card spreads over all
of them. Each chain run is a process of its own: one process can hold one library per op.

    python benchmarks/kernel_variants.py --quant int8 --rounds 2 \\
        --variant 'no-prefetch=kernels/csrc/linear_int8_gemv.cu:^.*cp\\.async\\.bulk\\.prefetch.*$=>' \\
        --variant 'unroll8=kernels/csrc/linear_int8_gemv.cu:kUnroll = 4=>kUnroll = 8'

A variant is NAME=FILE:PATTERN=>REPLACEMENT (FILE relative to the package; PATTERN a Python regular
expression in multi-line mode); repeat --variant with the same NAME to apply several substitutions.
A change too large for a pattern replaces the whole file: --variant-file NAME=FILE=SOURCE (SOURCE a path
to the variant's copy of FILE).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent.parent / "oiv2compile"
CHAIN = Path(__file__).resolve().parent / "bench_linear_chain.py"


def parse_variants(specs: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """NAME=FILE:PATTERN=>REPLACEMENT, repeated → {name: [(file, pattern, replacement), ...]}."""
    variants: dict[str, list[tuple[str, str, str]]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        path, sep2, rule = rest.partition(":")
        pattern, sep3, replacement = rule.partition("=>")
        if not (sep and sep2 and sep3 and name and path and pattern) or name == "base":
            raise ValueError(f"--variant takes NAME=FILE:PATTERN=>REPLACEMENT (NAME not 'base'), not {spec!r}")
        variants.setdefault(name, []).append((path, pattern, replacement))
    return variants


def parse_variant_files(specs: list[str]) -> dict[str, list[tuple[str, Path]]]:
    """NAME=FILE=SOURCE, repeated → {name: [(file, source), ...]}."""
    variants: dict[str, list[tuple[str, Path]]] = {}
    for spec in specs:
        name, path, source = [*spec.split("=", 2), "", ""][:3]
        if not (name and path and source) or name == "base" or not Path(source).is_file():
            raise ValueError(f"--variant-file takes NAME=FILE=SOURCE (NAME not 'base', SOURCE a file), not {spec!r}")
        variants.setdefault(name, []).append((path, Path(source)))
    return variants


def make_tree(
    root: Path, name: str, rules: list[tuple[str, str, str]], files: list[tuple[str, Path]] | None = None
) -> Path:
    """A copy of the package under root/name with the files replaced, then the rules applied; raises if
    a rule matches nothing or a replaced file is not in the package."""
    tree = root / name
    shutil.copytree(PACKAGE, tree / "oiv2compile", ignore=shutil.ignore_patterns("__pycache__"))
    for path, source in files or []:
        target = tree / "oiv2compile" / path
        if not target.is_file():
            raise ValueError(f"variant {name}: {path} is not a file of the package")
        shutil.copyfile(source, target)
    for path, pattern, replacement in rules:
        target = tree / "oiv2compile" / path
        text, count = re.subn(pattern, replacement, target.read_text(), flags=re.MULTILINE)
        if count == 0:
            raise ValueError(f"variant {name}: {pattern!r} matches nothing in {path}")
        target.write_text(text)
    return tree


# The kernel library each kind of chain runs: a variant tree compiles only those its --quant needs.
LIBRARIES = {"int8": "linear_int8_gemv", "int4": "linear_int4_mma"}


def libraries(quant: str) -> list[str]:
    """The kernel modules the chain's quantizations (e.g. "int8-norm-act,int4") run."""
    kinds = {q.strip().split("-")[0] for q in quant.split(",")}
    return [module for kind, module in LIBRARIES.items() if kind in kinds]


def compile_kernels(tree: Path, modules: list[str]) -> subprocess.CompletedProcess:
    code = "; ".join(
        [f"from oiv2compile.kernels import {', '.join(modules)}"] + [f"print({m}.load_extension())" for m in modules]
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tree)


def compiled(trees: dict[str, Path], built: dict[str, subprocess.CompletedProcess]) -> dict[str, Path]:
    """The trees whose kernels compiled; each that did not is reported and left out. Raises if base did not."""
    kept = {}
    for name, tree in trees.items():
        result = built.get(name)
        if result is not None and result.returncode != 0:
            if name == "base":
                raise RuntimeError(f"the unchanged tree did not compile:\n{result.stderr[-3000:]}")
            print(f"variant {name} did not compile, left out:\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        kept[name] = tree
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME=FILE:PATTERN=>REPLACEMENT")
    parser.add_argument("--variant-file", action="append", default=[], help="NAME=FILE=SOURCE")
    parser.add_argument(
        "--variant-args",
        action="append",
        default=[],
        help="NAME=ARGS: extra bench_linear_chain.py arguments of a variant",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--quant", default="int8,int4")
    parser.add_argument("--keep", type=Path, default=None, help="build the trees here and keep them")
    parser.add_argument(
        "--run-timeout", type=float, default=300.0, help="seconds a chain run may take; a variant past it is left out"
    )
    args = parser.parse_args()
    try:
        variants = {"base": [], **parse_variants(args.variant)}
        files = parse_variant_files(args.variant_file)
        variants.update({name: [] for name in files if name not in variants})
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    extra = dict(spec.split("=", 1) for spec in args.variant_args)
    if any(name not in variants for name in extra):
        print(f"--variant-args names a variant not given: {sorted(set(extra) - set(variants))}", file=sys.stderr)
        return 2
    root = args.keep or Path(tempfile.mkdtemp(prefix="oiv2-variants-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        trees = {name: make_tree(root, name, rules, files.get(name)) for name, rules in variants.items()}
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    modules = libraries(args.quant)
    # Elsewhere than on CUDA the ops run their references: nothing to compile.
    cuda = torch.cuda.is_available() and bool(modules)
    with ThreadPoolExecutor(max_workers=len(trees)) as pool:
        compile_tree = partial(compile_kernels, modules=modules)
        built = dict(zip(trees, pool.map(compile_tree, trees.values()), strict=True)) if cuda else {}
    try:
        trees = compiled(trees, built)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    chain = [sys.executable, str(CHAIN), "--model", args.model, "--quant", args.quant]
    for round_ in range(1, args.rounds + 1):
        for name, tree in list(trees.items()):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            print(f"\n## {name}, round {round_}", flush=True)
            label = ["--label", f"({name}, round {round_})"]
            try:
                subprocess.run(
                    [*chain, *label, *extra.get(name, "").split()],
                    env=env,
                    check=True,
                    cwd=tree,
                    timeout=args.run_timeout,
                )
            except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:
                print(f"variant {name} left out: {exc}", file=sys.stderr)
                print(f"(left out: {type(exc).__name__})", flush=True)
                del trees[name]
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
