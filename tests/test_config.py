"""BuildConfig: defaults, validation, JSON round trip, overrides, resolution, fingerprint."""

from __future__ import annotations

import dataclasses

import pytest

from oiv2compile.config import Backend, BuildConfig, Device, DType
from oiv2compile.errors import ConfigError


def test_defaults_and_frozen():
    cfg = BuildConfig()
    assert cfg.backend is Backend.INDUCTOR and cfg.device is Device.AUTO and cfg.dtype is DType.AUTO
    assert cfg.max_batch_size == 8 and cfg.max_seq_len is None
    assert cfg.enable_verification and cfg.attention.enable_substitution and cfg.kv_cache.enable_rewrite
    assert (
        cfg.fusion.enable_qkv and cfg.fusion.enable_ffn and cfg.fusion.enable_norms and cfg.fusion.enable_rope_kv_write
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_batch_size = 2  # type: ignore[misc]


def test_json_round_trip():
    cfg = BuildConfig().replace(backend="eager", max_seq_len=512, cuda_graphs={"batch_buckets": [1, 3, 8]})
    assert BuildConfig.from_json(cfg.to_json()) == cfg
    assert cfg.cuda_graphs.batch_buckets == (1, 3, 8)
    assert cfg.to_dict()["backend"] == "eager"


def test_fingerprint_follows_content():
    assert BuildConfig().fingerprint() == BuildConfig().fingerprint()
    assert BuildConfig().fingerprint() != BuildConfig(max_batch_size=4).fingerprint()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(max_batch_size=0), "max_batch_size must be between 1 and 1024"),
        (dict(max_seq_len=1), "max_seq_len must be between"),
        (dict(backend="tensorrt"), "backend must be one of"),
        (dict(dtype="int3"), "dtype must be one of"),
        (dict(max_batch_size="8"), "must be a whole number"),
        (dict(enable_verification="yes"), "must be true or false"),
        (dict(colour="red"), "Unknown build option 'colour'"),
        (dict(attention={"enable_substitution": True, "speed": 2}), "Unknown AttentionConfig option"),
        (dict(cuda_graphs={"batch_buckets": [1, 16]}), "between 1 and max_batch_size"),
        (dict(cuda_graphs={"batch_buckets": [1, 2]}), "largest CUDA graph batch bucket"),
        (dict(kv_cache={"enable_rewrite": False}), "enable the KV-cache rewrite"),
    ],
)
def test_validation_raises_value_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        BuildConfig().replace(**overrides)
    assert isinstance(info.value, ValueError)


def test_resolve_auto():
    assert BuildConfig().resolve(cuda_available=False).device is Device.CPU
    assert BuildConfig().resolve(cuda_available=False).dtype is DType.FLOAT32
    cuda = BuildConfig().resolve(cuda_available=True)
    assert (cuda.device, cuda.dtype) == (Device.CUDA, DType.BFLOAT16)
    assert BuildConfig(dtype=DType.FLOAT16).resolve(cuda_available=True).dtype is DType.FLOAT16
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        BuildConfig(device=Device.CUDA).resolve(cuda_available=False)


def test_decode_buckets():
    assert BuildConfig(max_batch_size=8).decode_buckets() == (1, 2, 4, 8)
    assert BuildConfig(max_batch_size=6).decode_buckets() == (1, 2, 4, 6)
    assert BuildConfig(max_batch_size=1).decode_buckets() == (1,)


def test_the_onnx_backend_builds_without_the_fusions_it_cannot_lower():
    from oiv2compile.config import FusionConfig

    onnx = BuildConfig().replace(backend="onnx").resolve(cuda_available=False)
    assert onnx.fusion == FusionConfig(
        enable_qkv=True,
        enable_ffn=False,
        enable_norms=False,
        enable_rope_kv_write=False,
        enable_rope_into_attention=False,
        enable_norm_into_linear=False,
        enable_gated_act_into_linear=False,
    )
    assert not onnx.quant.include_embedding  # oiv2::embedding_int8/int4 have no ONNX translation
    inductor = BuildConfig().resolve(cuda_available=False)
    assert inductor.fusion == FusionConfig() and inductor.quant.include_embedding
