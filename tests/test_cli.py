"""The CLI: each user error is one sentence on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from oiv2compile.cli import main


def _cli(capsys, *argv):  # type: ignore[no-untyped-def]
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_sentence_error(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("oiv2compile: error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err


@pytest.fixture
def artifact_copy(artifacts, tmp_path):  # type: ignore[no-untyped-def]
    dst = tmp_path / "artifact"
    shutil.copytree(artifacts("llama-tiny", "eager"), dst)
    return dst


def test_build_run_inspect(capsys, tmp_path):
    out = tmp_path / "a"
    code, _, err = _cli(
        capsys,
        "build",
        "llama-tiny",
        "-o",
        str(out),
        "--backend",
        "eager",
        "--device",
        "cpu",
        "--max-seq-len",
        "64",
        "--max-batch-size",
        "2",
        "--no-fuse-norms",
        "--no-fuse-gated-act-into-linear",
        "--no-fuse-rope-into-attention",
    )
    assert code == 0, err
    assert "capture prefill:" in err and "lower decode (eager):" in err and f"built {out}" in err
    code, stdout, err = _cli(capsys, "run", str(out), "--token-ids", "1,2,3", "--max-new-tokens", "5")
    assert code == 0, err
    ids = [int(t) for t in err.split("token ids: ")[1].splitlines()[0].split(",")]
    assert len(ids) <= 5 and "tokens/s" in err
    code, stdout, err = _cli(capsys, "run", str(out), "--prompt", "hi", "--max-new-tokens", "4", "--stream")
    assert code == 0, err
    code, stdout, _ = _cli(capsys, "inspect", str(out))
    assert code == 0
    assert "substitute_attention" in stdout and "weights-00001-of-00001.safetensors" in stdout
    code, stdout, _ = _cli(capsys, "inspect", str(out), "--json")
    manifest = json.loads(stdout)
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["build_config"]["fusion"] == {
        "enable_qkv": True,
        "enable_ffn": True,
        "enable_norms": False,
        "enable_rope_kv_write": True,
        "enable_rope_into_attention": False,
        "enable_norm_into_linear": True,
        "enable_gated_act_into_linear": False,
    }
    assert "fuse_norms" not in manifest["passes"]["decode"] and manifest["passes"]["decode"]["fuse_ffn"]["count"] == 2


def test_build_errors(capsys, tmp_path):
    code, _, err = _cli(capsys, "build", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert code == 2
    _one_sentence_error(err, "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, "build", str(tmp_path / "empty"), "-o", str(tmp_path / "o"))
    assert code == 2
    _one_sentence_error(err, "has no config.json")
    code, _, err = _cli(capsys, "build", "llama-tiny", "-o", str(tmp_path / "o"), "--max-batch-size", "0")
    assert code == 2
    _one_sentence_error(err, "max_batch_size must be between 1 and 1024")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4)
    ).save_pretrained(tmp_path / "mamba")
    code, _, err = _cli(capsys, "build", str(tmp_path / "mamba"), "-o", str(tmp_path / "o"), "--device", "cpu")
    assert code == 2
    _one_sentence_error(err, "MambaForCausalLM")
    assert not (tmp_path / "o").exists()


def test_changed_weights(capsys, artifact_copy):
    weights = next(artifact_copy.glob("weights-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    code, _, err = _cli(capsys, "run", str(artifact_copy), "--token-ids", "1,2")
    assert code == 2
    _one_sentence_error(err, "changed after the build")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"torch_version": "1.0.0"}, "built with torch 1.0.0"),
        ({"device": {"type": "cuda", "name": "NVIDIA H200", "capability": [9, 0]}}, "GPU"),
    ],
)
def test_manifest_from_elsewhere(capsys, artifact_copy, change, fragment):
    if "device" in change and torch.cuda.is_available():
        pytest.skip("the refusal differs where a GPU is present (tested in runtime/test_artifact.py)")
    path = artifact_copy / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    code, _, err = _cli(capsys, "run", str(artifact_copy), "--token-ids", "1,2")
    assert code == 2
    _one_sentence_error(err, fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--token-ids", ",".join(["5"] * 129), "--max-new-tokens", "1"], "max_seq_len is 128"),
        (["--token-ids", "1,2,3", "--max-new-tokens", "126"], "needs 129 cache positions"),
        (["--prompt", ""], "Prompt 0 is empty"),
        (["--token-ids", ""], "Prompt 0 is empty"),
        (["--token-ids", "1,x"], "comma-separated whole numbers"),
    ],
)
def test_bad_requests(capsys, artifacts, args, fragment):
    code, _, err = _cli(capsys, "run", str(artifacts("llama-tiny", "eager")), *args)
    assert code == 2
    _one_sentence_error(err, fragment)


def test_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oiv2compile", "run", str(tmp_path / "nothing"), "--token-ids", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"oiv2compile: error: {tmp_path / 'nothing'} does not exist; build an artifact there first with "
        "`oiv2compile build`."
    ]
