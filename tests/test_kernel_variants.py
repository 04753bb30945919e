"""benchmarks/kernel_variants.py: the variant trees it builds (the timing itself needs a GPU)."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_variants.py"
spec = importlib.util.spec_from_file_location("kernel_variants", SCRIPT)
kernel_variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_variants)

SOURCE = "kernels/csrc/linear_int4_mma.cu"


def test_a_variant_file_replaces_the_file_and_the_rules_apply_after(tmp_path):
    copy = tmp_path / "variant.cu"
    copy.write_text("constexpr int kStages = 4;\n// the variant\n")
    files = kernel_variants.parse_variant_files([f"v={SOURCE}={copy}"])
    rules = kernel_variants.parse_variants([f"v={SOURCE}:kStages = 4=>kStages = 6"])
    assert files == {"v": [(SOURCE, copy)]}
    tree = kernel_variants.make_tree(tmp_path / "trees", "v", rules["v"], files["v"])
    assert (tree / "oiv2compile" / SOURCE).read_text() == "constexpr int kStages = 6;\n// the variant\n"
    base = kernel_variants.make_tree(tmp_path / "trees", "base", [])
    assert (base / "oiv2compile" / SOURCE).read_bytes() == (kernel_variants.PACKAGE / SOURCE).read_bytes()


def test_variant_files_are_refused_when_malformed_or_missing(tmp_path):
    copy = tmp_path / "variant.cu"
    copy.write_text("x")
    for spec in (f"base={SOURCE}={copy}", f"v={SOURCE}", f"v={SOURCE}={tmp_path / 'absent.cu'}"):
        with pytest.raises(ValueError, match="NAME=FILE=SOURCE"):
            kernel_variants.parse_variant_files([spec])
    with pytest.raises(ValueError, match="not a file of the package"):
        kernel_variants.make_tree(tmp_path / "trees", "v", [], [("kernels/csrc/absent.cu", copy)])
    with pytest.raises(ValueError, match="matches nothing"):
        kernel_variants.make_tree(tmp_path / "trees2", "w", [(SOURCE, "no such text", "")])


def test_a_variant_that_did_not_compile_is_left_out_but_base_must_compile(tmp_path, capsys):
    trees = {"base": tmp_path / "base", "good": tmp_path / "good", "bad": tmp_path / "bad"}

    def result(code: int) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], code, "", "nvcc: error")

    built = {"base": result(0), "good": result(0), "bad": result(1)}
    assert kernel_variants.compiled(trees, built) == {"base": trees["base"], "good": trees["good"]}
    assert "variant bad did not compile" in capsys.readouterr().err
    assert kernel_variants.compiled(trees, {}) == trees  # no GPU: nothing was compiled
    with pytest.raises(RuntimeError, match="unchanged tree"):
        kernel_variants.compiled(trees, {**built, "base": result(1)})


def test_a_tree_compiles_only_the_libraries_its_chain_runs():
    assert kernel_variants.libraries("int8-norm-act") == ["linear_int8_gemv"]
    assert kernel_variants.libraries("bf16,int4-norm") == ["linear_int4_mma"]
    assert kernel_variants.libraries("int8, int4") == ["linear_int8_gemv", "linear_int4_mma"]
    assert kernel_variants.libraries("bf16") == []
