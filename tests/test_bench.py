"""`oiv2compile bench` on CPU: the whole command on llama-tiny, the artifact cache, user errors, and the
arithmetic of its figures on known numbers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from oiv2compile.backends import onnx as onnx_backend
from oiv2compile.bench import (
    PLOTS,
    REPORT,
    ROW_FIELDS,
    TABLE,
    BenchRequest,
    _engine_timings,
    commit,
    markdown_table,
    percentile,
    roofline_tok_s,
    run_bench,
    spread,
    step_bytes,
    write_report,
)
from oiv2compile.cli import main

BACKENDS = ("inductor", "eager", "onnx", "tensorrt")
QUANTS = ("none", "int8")
BATCHES = (1, 2)
PROMPT_LEN, NEW_TOKENS, REPEATS = 8, 8, 2
REPORT_KEYS = {
    "schema_version",
    "model",
    "args",
    "device",
    "dtype",
    "date",
    "environment",
    "copy_bandwidth_gbs",
    "rows",
    "complete",
    "plots",
    "plots_note",
}
ENVIRONMENT_KEYS = {
    "device",
    "driver",
    "cuda",
    "torch",
    "transformers",
    "triton",
    "python",
    "platform",
    "cpu_count",
    "oiv2compile",
    "commit",
}
ROW_KEYS = {"kind", "backend", "quant", "batch", "status", "reason", *ROW_FIELDS}


def _bench(out: Path, *argv: str) -> tuple[int, str, str]:
    """Run the command in-process; return its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["bench", *argv, "--out", str(out)])
    return code, stdout.getvalue(), stderr.getvalue()


def _tiny_args(cache: Path, *argv: str) -> list[str]:
    lengths = ["--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS)]
    runs = ["--repeats", str(REPEATS), "--warmup", "1", "--cache-dir", str(cache)]
    return [*argv, *lengths, *runs]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The full command once: four builds (inductor and eager, float and int8), unavailable rows (onnx
    without its extra, tensorrt), the hf-eager baseline."""
    cache = tmp_path_factory.mktemp("bench-cache")
    out = tmp_path_factory.mktemp("bench-out")
    argv = _tiny_args(
        cache,
        "llama-tiny",
        "--backends",
        ",".join(BACKENDS),
        "--baselines",
        "hf-eager",
        "--quant",
        ",".join(QUANTS),
        "--batch-sizes",
        ",".join(map(str, BATCHES)),
    )
    # ONNX builds would double this test's time; tests/backends/test_onnx.py benches an onnx artifact.
    # Here onnx stands for a backend whose extra is not installed.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_backend, "_find_spec", lambda name: None)
        code, stdout, stderr = _bench(out, *argv)
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "cache": cache}


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / REPORT).read_text())


def _positive_finite(value: Any) -> bool:
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def _check_ok_row(row: dict[str, Any]) -> None:
    for name in ("decode_tok_s", "ttft_s", "tpot_ms", "e2e_s", "step_ms", "load_s", "warmup_s"):
        assert _positive_finite(row[name]), (name, row)
    for name in ("weight_bytes", "kv_bytes_per_token", "step_bytes", "roofline_tok_s", "share_of_roofline"):
        assert _positive_finite(row[name]), (name, row)
    assert len(row["step_ms"]) == REPEATS * (NEW_TOKENS - 1)
    d = row["decode_tok_s"]
    assert d["min"] <= d["median"] <= d["max"]
    assert row["tpot_ms"]["p50"] <= row["tpot_ms"]["p95"] <= row["tpot_ms"]["p99"]
    # Resident-set growth on the CPU can be 0: the allocator reuses memory an earlier row freed.
    assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] >= 0
    assert row["memory_kind"] == "rss"
    if row["kind"] == "oiv2compile":
        assert _positive_finite(row["build_s"]) and isinstance(row["reused"], bool)
        assert (Path(row["artifact"]) / "manifest.json").is_file()
    else:
        assert row["build_s"] is None and row["artifact"] is None


def test_bench_measures_every_requested_row(first_run):
    assert first_run["code"] == 0, first_run["stderr"]
    report = _report(first_run["out"])
    assert set(report) == REPORT_KEYS
    assert report["schema_version"] == 1 and report["model"] == "llama-tiny" and report["device"] == "cpu"
    assert set(report["environment"]) == ENVIRONMENT_KEYS and report["environment"]["driver"] == "cpu"
    assert _positive_finite(report["copy_bandwidth_gbs"])

    keys = [(r["backend"], r["quant"], r["batch"]) for r in report["rows"]]
    expected = [(b, q, n) for b in BACKENDS for q in QUANTS for n in BATCHES]
    expected += [("hf-eager", "none", n) for n in BATCHES]
    assert keys == expected
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        if row["backend"] in ("inductor", "eager", "hf-eager"):
            assert row["status"] == "ok" and row["reason"] is None, row
            _check_ok_row(row)
            assert row["reused"] in (False, None)
        else:
            assert row["status"] == "unavailable" and row["decode_tok_s"] is None, row
            missing = "oiv2compile[onnx]" if row["backend"] == "onnx" else "no " + row["backend"]
            assert missing in row["reason"]
    int8 = {(r["backend"], r["batch"]): r for r in report["rows"] if r["quant"] == "int8"}
    none = {(r["backend"], r["batch"]): r for r in report["rows"] if r["quant"] == "none"}
    assert int8[("inductor", 1)]["weight_bytes"] < none[("inductor", 1)]["weight_bytes"]

    table = [line for line in first_run["stdout"].splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(expected)  # the header, then one line per row
    assert (
        "| onnx | none | 1 | unavailable: The onnx backend needs onnx, onnxscript, onnxruntime;" in first_run["stdout"]
    )
    assert "| tensorrt | none | 1 | unavailable: oiv2compile has no tensorrt backend" in first_run["stdout"]
    assert report["plots"] == list(PLOTS) and report["plots_note"] is None
    assert all((first_run["out"] / name).stat().st_size > 0 for name in PLOTS)
    assert report["complete"] is True
    assert (first_run["out"] / TABLE).read_text() == first_run["stdout"]


def test_bench_writes_each_row_as_it_is_measured(tmp_path):
    """The checkpoint sees the report after every row, so a run stopped part-way keeps what it measured;
    write_report of a partial report writes the JSON and the table, no plots."""
    request = BenchRequest(
        model="llama-tiny", backends=(), baselines=("hf-eager",), batch_sizes=(1, 2), prompt_len=4, new_tokens=4
    )
    seen = []

    def checkpoint(partial: dict[str, Any]) -> None:
        write_report(partial, tmp_path, plots=False)
        on_disk = _report(tmp_path)
        seen.append(([r["batch"] for r in on_disk["rows"]], on_disk["complete"], on_disk["plots"]))
        assert (tmp_path / TABLE).read_text() == markdown_table(partial)

    report = run_bench(request, checkpoint=checkpoint)
    assert seen == [([1], False, []), ([1, 2], True, [])]
    assert report["complete"] is True and [r["batch"] for r in report["rows"]] == [1, 2]
    assert not any((tmp_path / name).exists() for name in PLOTS)


def test_bench_reuses_cached_artifacts(first_run, tmp_path):
    assert first_run["code"] == 0, first_run["stderr"]
    built = {
        (r["backend"], r["batch"]): r
        for r in _report(first_run["out"])["rows"]
        if r["status"] == "ok" and r["quant"] == "none"
    }
    manifests = {
        r["artifact"]: (Path(r["artifact"]) / "manifest.json").stat().st_mtime_ns
        for r in built.values()
        if r["kind"] == "oiv2compile"
    }
    assert len(manifests) == 2  # one artifact per backend serves both batch sizes
    argv = _tiny_args(
        first_run["cache"], "llama-tiny", "--backends", "inductor,eager", "--baselines", "", "--batch-sizes", "1,2"
    )
    code, _, err = _bench(tmp_path, *argv)
    assert code == 0, err
    rows = _report(tmp_path)["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("inductor", 1), ("inductor", 2), ("eager", 1), ("eager", 2)]
    for row in rows:
        _check_ok_row(row)
        assert row["reused"] is True and row["artifact"] == built[(row["backend"], row["batch"])]["artifact"]
        manifest = json.loads((Path(row["artifact"]) / "manifest.json").read_text())
        assert row["build_s"] == pytest.approx(sum(manifest["phases_s"].values()))
        assert row["build_phases_s"] == manifest["phases_s"]
    assert {a: (Path(a) / "manifest.json").stat().st_mtime_ns for a in manifests} == manifests


def test_report_without_matplotlib(monkeypatch, tmp_path):
    """Without matplotlib the report is written all the same, and says why it has no plots."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    report = {
        "schema_version": 1,
        "model": "m",
        "dtype": "float32",
        "device": "cpu",
        "environment": {"device": "cpu", "torch": "t", "commit": "c"},
        "args": {"prompt_len": 1, "new_tokens": 2, "batch_sizes": [1]},
        "copy_bandwidth_gbs": 1.0,
        "rows": [],
    }
    path, note = write_report(report, tmp_path)
    assert note is not None and "matplotlib is not installed" in note
    assert json.loads(path.read_text()) == {**report, "plots": [], "plots_note": note}
    assert not any((tmp_path / name).exists() for name in PLOTS)


def test_bench_an_artifact(first_run, tmp_path):
    """An artifact is measured as it is: a batch beyond its max_batch_size is an unavailable row, and the
    baseline recreates the preset's weights from the recorded seed."""
    assert first_run["code"] == 0, first_run["stderr"]
    artifact = next(r["artifact"] for r in _report(first_run["out"])["rows"] if r["backend"] == "inductor")
    argv = _tiny_args(tmp_path / "unused-cache", artifact, "--baselines", "hf-eager", "--batch-sizes", "1,4")
    code, _, err = _bench(tmp_path / "out", *argv)
    assert code == 0, err
    rows = _report(tmp_path / "out")["rows"]
    assert [(r["backend"], r["batch"], r["status"]) for r in rows] == [
        ("inductor", 1, "ok"),
        ("inductor", 4, "unavailable"),
        ("hf-eager", 1, "ok"),
        ("hf-eager", 4, "ok"),
    ]
    assert "at most 2" in rows[1]["reason"]
    assert rows[0]["reused"] is True and rows[0]["artifact"] == artifact
    for row in (rows[0], rows[2], rows[3]):
        _check_ok_row(row)
    assert not (tmp_path / "unused-cache").exists()


def test_bench_a_quantized_artifact_measures_its_own_quantization(first_run, tmp_path):
    assert first_run["code"] == 0, first_run["stderr"]
    artifact = next(
        r["artifact"] for r in _report(first_run["out"])["rows"] if (r["backend"], r["quant"]) == ("eager", "int8")
    )
    code, _, err = _bench(tmp_path / "out", *_tiny_args(tmp_path / "cache", artifact, "--baselines", ""))
    assert code == 0, err
    report = _report(tmp_path / "out")
    assert [(r["backend"], r["quant"], r["status"]) for r in report["rows"]] == [("eager", "int8", "ok")]
    assert report["args"]["quants"] is None  # what was asked: the artifact's own
    # Asking for another quantization of an artifact is an unavailable row that says why.
    code, _, err = _bench(
        tmp_path / "out2", *_tiny_args(tmp_path / "cache", artifact, "--baselines", "", "--quant", "none")
    )
    assert code == 0, err
    (row,) = _report(tmp_path / "out2")["rows"]
    assert row["status"] == "unavailable" and "quantization int8" in row["reason"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["llama-tiny", "--batch-sizes", "0"], "--batch-sizes takes whole numbers of at least 1"),
        (["llama-tiny", "--batch-sizes", "a"], "--batch-sizes takes comma-separated whole numbers"),
        (["llama-tiny", "--backends", "inductor,foo"], "--backends has 'foo'"),
        (["llama-tiny", "--quant", "int3"], "--quant has 'int3'"),
        (["llama-tiny", "--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["llama-tiny", "--prompt-len", "600"], "max_position_embeddings"),
        (["no-such-model"], "does not exist"),
    ],
)
def test_bench_user_errors(argv, fragment, tmp_path):
    code, stdout, err = _bench(tmp_path / "out", *argv, "--cache-dir", str(tmp_path / "cache"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("oiv2compile: error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err and stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_bench_artifact_too_short_for_the_lengths(first_run, tmp_path):
    assert first_run["code"] == 0, first_run["stderr"]
    artifact = next(r["artifact"] for r in _report(first_run["out"])["rows"] if r["backend"] == "eager")
    code, _, err = _bench(tmp_path / "out", artifact, "--prompt-len", "200", "--new-tokens", "8")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("oiv2compile: error:")]
    assert len(lines) == 1 and "needs 208 cache positions but the artifact holds 128" in lines[0], err


def test_percentile_and_spread_on_known_numbers():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile([7.0], 99) == 7.0
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}


def test_roofline_on_known_numbers():
    # 1000 weight bytes, 10 cache bytes per token, 2 sequences of 5.5 filled tokens each: 1110 bytes a step.
    assert step_bytes(1000, 10, 2, 5.5) == 1110.0
    # 1 GB/s streams 1e6-byte steps 1000 times a second; a batch of 4 makes 4 tokens a step.
    assert roofline_tok_s(1.0, 1e6, 4) == pytest.approx(4000.0)


def test_engine_timings_on_known_numbers():
    # token_times_s of two repeats at batch 2: time to first token, then three decode steps.
    figures = _engine_timings(2, [[0.5, 0.1, 0.1, 0.2], [0.4, 0.2, 0.2, 0.2]])
    assert figures["ttft_s"] == pytest.approx({"median": 0.45, "min": 0.4, "max": 0.5})
    # 2 sequences × 3 steps over 0.4 s and over 0.6 s.
    assert figures["decode_tok_s"] == pytest.approx({"median": 12.5, "min": 10.0, "max": 15.0})
    assert figures["e2e_s"] == pytest.approx({"median": 0.95, "min": 0.9, "max": 1.0})
    assert figures["step_ms"] == pytest.approx([100.0, 100.0, 200.0, 200.0, 200.0, 200.0])
    assert figures["tpot_ms"] == pytest.approx({"p50": 200.0, "p95": 200.0, "p99": 200.0})


def test_table_marks_memory_measured_as_the_gpus_used_memory(first_run):
    """An onnx row on CUDA reports the GPU's used memory (ONNX Runtime allocates outside PyTorch):
    the table says so, the other rows stay plain numbers."""
    report = _report(first_run["out"])
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    ok[0]["memory_kind"] = "gpu_device_used"
    lines = [
        line for line in markdown_table(report).splitlines() if line.startswith("| ") and "unavailable" not in line
    ]
    rows = lines[1:]
    assert rows[0].endswith(" (GPU used) |") and not any("GPU used" in line for line in rows[1:])


def test_bench_a_build_refused_in_its_own_process_becomes_the_rows_reason(tmp_path):
    """Builds run in a child process; the user error raised there (llama-tiny's 64 input features are
    no multiple of the default int4 group, 128) comes back as the row's reason, and the failed build
    leaves nothing in the cache."""
    cache = tmp_path / "cache"
    argv = _tiny_args(cache, "llama-tiny", "--backends", "eager", "--quant", "int4", "--baselines", "")
    code, _, err = _bench(tmp_path / "out", *argv, "--batch-sizes", "1")
    assert code == 0, err
    (row,) = _report(tmp_path / "out")["rows"]
    assert row["status"] == "unavailable", row
    assert "not a multiple of the int4 group size 128" in row["reason"], row
    assert not cache.exists() or not any(cache.iterdir())


def _refused_builds(monkeypatch):  # type: ignore[no-untyped-def]
    """Builds refused with a user error, each one's config kept by quantization: {quant: BuildConfig}."""
    from oiv2compile import bench
    from oiv2compile.errors import BuildError

    configs = {}

    def refuse(model, path, config):  # type: ignore[no-untyped-def]
        configs[config.quantization.value] = config
        raise BuildError("not built in this test")

    monkeypatch.setattr(bench, "_build_in_child_process", refuse)
    return configs


def test_bench_builds_every_artifact_with_the_rope_kernel_apart_when_asked(monkeypatch, tmp_path):
    """--no-fuse-rope-into-attention changes every build's config, and the table names each row's form;
    without it every build has the rotary kernel inside the attention (the default)."""
    configs = _refused_builds(monkeypatch)
    argv = _tiny_args(
        tmp_path / "cache", "llama-tiny", "--backends", "eager", "--quant", "none,int8", "--baselines", ""
    )
    code, stdout, err = _bench(tmp_path / "out", *argv, "--no-fuse-rope-into-attention")
    assert code == 0, err
    assert not configs["none"].fusion.enable_rope_into_attention
    assert not configs["int8"].fusion.enable_rope_into_attention
    assert "| eager | none (rope apart) | 1 | unavailable" in stdout
    assert "| eager | int8 (rope apart) | 1 | unavailable" in stdout
    assert _report(tmp_path / "out")["args"]["fuse_rope_into_attention"] is False
    code, stdout, err = _bench(tmp_path / "out2", *argv)
    assert code == 0, err
    assert configs["int8"].fusion.enable_rope_into_attention and "| eager | int8 | 1 | unavailable" in stdout
    assert _report(tmp_path / "out2")["args"]["fuse_rope_into_attention"] is True


def test_bench_builds_only_its_int8_artifacts_with_the_norms_apart(monkeypatch, tmp_path):
    """--fuse-norm-into-linear changes the int8 builds' config alone, so the float row reuses the cache
    entry of a run without it; the table names the int8 row's form."""
    configs = _refused_builds(monkeypatch)
    argv = _tiny_args(
        tmp_path / "cache", "llama-tiny", "--backends", "eager", "--quant", "none,int8,int4", "--baselines", ""
    )
    code, stdout, err = _bench(tmp_path / "out", *argv, "--no-fuse-norm-into-linear")
    assert code == 0, err
    assert not configs["int8"].fusion.enable_norm_into_linear and configs["none"].fusion.enable_norm_into_linear
    assert not configs["int4"].fusion.enable_norm_into_linear
    assert "| eager | int8 (norms apart) | 1 | unavailable" in stdout
    assert "| eager | int4 (norms apart) | 1 | unavailable" in stdout
    assert _report(tmp_path / "out")["args"]["fuse_norm_into_linear"] is False
    with_flag = {quant: config.fingerprint() for quant, config in configs.items()}
    code, stdout, err = _bench(tmp_path / "out2", *argv)
    assert code == 0, err
    assert configs["none"].fingerprint() == with_flag["none"] and configs["int8"].fingerprint() != with_flag["int8"]
    assert "| eager | int8 | 1 | unavailable" in stdout


def test_the_commit_names_a_tree_that_differs_from_head(tmp_path, monkeypatch):
    """The report's commit is HEAD's, marked "+changes" where the package's tracked files differ from it
    (a copy of a later tree over an older checkout), and $OIV2_COMMIT where set."""
    monkeypatch.delenv("OIV2_COMMIT", raising=False)
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "kernel.py").write_text("a = 1\n")

    def git(*argv: str) -> str:
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        }
        done = subprocess.run(["git", *argv], cwd=tmp_path, capture_output=True, text=True, check=True, env=env)
        return done.stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked, outside the package\n")
    assert commit(package) == head
    (package / "kernel.py").write_text("a = 2\n")
    assert commit(package) == f"{head}+changes"
    monkeypatch.setenv("OIV2_COMMIT", "abc1234")
    assert commit(package) == "abc1234"
    assert commit(tmp_path / "missing") == "abc1234"  # $OIV2_COMMIT is read first
    monkeypatch.delenv("OIV2_COMMIT")
    assert commit(tmp_path / "missing") == "unknown"
