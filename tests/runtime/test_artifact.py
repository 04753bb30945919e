"""The artifact's checks: every refusal is a typed error with one sentence, before anything loads."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import oiv2compile
from oiv2compile.errors import ArtifactError
from oiv2compile.runtime import artifact


@pytest.fixture
def copy(artifacts, tmp_path):  # type: ignore[no-untyped-def]
    """A private copy of the tiny eager artifact that a test may damage."""
    dst = tmp_path / "artifact"
    shutil.copytree(artifacts("llama-tiny", "eager"), dst)
    return dst


def _edit_manifest(root, **changes):  # type: ignore[no-untyped-def]
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_loads_when_intact(copy):
    engine = oiv2compile.load(copy)
    assert engine.max_seq_len == 128 and engine.max_batch_size == 4


def test_changed_weights_are_refused(copy):
    weights = next(copy.glob("weights-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"changed after the build \(sha256 mismatch\)"):
        oiv2compile.load(copy)


def test_missing_file_is_refused(copy):
    (copy / "decode.pt2").unlink()
    with pytest.raises(ArtifactError, match=r"decode\.pt2 is missing"):
        oiv2compile.load(copy)


def test_other_torch_version_is_refused(copy):
    _edit_manifest(copy, torch_version="2.0.0")
    with pytest.raises(ArtifactError, match=re.escape(f"built with torch 2.0.0 but this is torch {torch.__version__}")):
        oiv2compile.load(copy)


def test_newer_format_is_refused(copy):
    _edit_manifest(copy, format_version=artifact.FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match="newer than this oiv2compile reads"):
        oiv2compile.load(copy)


def test_other_gpu_capability_is_refused(copy, monkeypatch):
    _edit_manifest(copy, device={"type": "cuda", "name": "NVIDIA H200", "capability": [9, 0]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ArtifactError, match=r"compute capability 9.0 \(NVIDIA H200\) but this GPU is 8.0"):
        artifact.check_compatible(json.loads((copy / "manifest.json").read_text()), torch.device("cuda", 0))


def test_other_device_type_is_refused(copy):
    with pytest.raises(ArtifactError, match="built for cpu and cannot run on cuda"):
        artifact.check_compatible(json.loads((copy / "manifest.json").read_text()), torch.device("cuda", 0))


def test_cpu_code_for_an_isa_this_cpu_lacks_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["device"]["cpu_isa"]  # recorded at build
    artifact.check_compatible(manifest, torch.device("cpu"))
    manifest["device"]["cpu_isa"] = "amx_tile_of_the_future"
    with pytest.raises(ArtifactError, match="compiled for amx_tile_of_the_future, which this CPU lacks"):
        artifact.check_compatible(manifest, torch.device("cpu"))


def test_weights_in_a_layout_the_kernels_no_longer_read_are_refused(copy):
    """An int8 CUDA artifact of the first tiles (an XOR swizzle the kernels no longer compute) would give wrong
    outputs without a word; it is refused before anything loads."""
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["quantization"] = {"layout": "int8-rowmajor-v1, int8-tiles16x1024-paired-v2, int8-tiles16x1024-v2"}
    artifact.check_compatible(manifest, torch.device("cpu"))
    manifest["quantization"]["layout"] = "int8-rowmajor-v1, int8-tiles16x1024-v1"
    with pytest.raises(ArtifactError, match="layout int8-tiles16x1024-v1, which this oiv2compile no longer reads"):
        artifact.check_compatible(manifest, torch.device("cpu"))


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        oiv2compile.load(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match=r"has no manifest\.json"):
        oiv2compile.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        oiv2compile.load(tmp_path)


def test_staging_directory_is_removed_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), artifact.staging_directory(out, overwrite=False) as staging:
        (staging / "half-written").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_staging_directory_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError), artifact.staging_directory(out, overwrite=True) as staging:
        (staging / "new").write_text("new")
        raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["old"]
    with artifact.staging_directory(out, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_weights_dedupe_and_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "SHARD_BYTES", 64)
    shared = torch.arange(8, dtype=torch.float32)  # 32 bytes
    named = {"a": shared, "b": shared, "c": torch.ones(8), "d": torch.zeros(8)}
    index = artifact.save_weights(named, tmp_path)
    assert index["aliases"] == {"b": "a"}
    assert index["tensors"] == 3 and index["bytes"] == 96
    assert len(index["files"]) == 2
    loaded = artifact.load_weights(tmp_path, index, torch.device("cpu"))
    assert loaded["b"] is loaded["a"]
    for name, tensor in named.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
