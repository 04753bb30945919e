"""The one build configuration: a frozen `BuildConfig` with nested frozen sub-configs.

Defaults are declared here and nowhere else. `resolve()` turns the `auto` choices into concrete ones
for the machine that builds; the resolved config is what the artifact's manifest records and what
`fingerprint()` hashes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from oiv2compile.errors import ConfigError

CONFIG_VERSION = 1


class Backend(str, enum.Enum):
    INDUCTOR = "inductor"  # AOTInductor: compiled ahead of time into .pt2 packages
    EAGER = "eager"  # the transformed graphs run op by op; for debugging
    ONNX = "onnx"  # exported to ONNX, optimized and run by ONNX Runtime (extra: oiv2compile[onnx])


class Device(str, enum.Enum):
    AUTO = "auto"  # cuda when a GPU is visible, else cpu
    CPU = "cpu"
    CUDA = "cuda"


class DType(str, enum.Enum):
    AUTO = "auto"  # bfloat16 on cuda, float32 on cpu
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Quantization(str, enum.Enum):
    NONE = "none"
    INT8 = "int8"  # per output channel, symmetric
    INT4 = "int4"  # groups along the input dimension, asymmetric (scale and zero point per group)


QUANT_GROUP_SIZES = (32, 64, 128)
QUANT_METHODS = ("rtn",)  # round to nearest; a calibrated method (GPTQ, AWQ) goes next to it


@dataclass(frozen=True)
class QuantConfig:
    # int4 only: input features per scale and zero point.
    group_size: int = 128
    # Quantize the output head too.
    include_output_head: bool = True
    # Quantize the token-embedding table too (passes/quantize_embedding.py); a table tied to a
    # quantized head reads the head's tensors.
    include_embedding: bool = True
    # int4 linears on the hand-written CUDA C++ tensor-core op (repacked at build time) and one-row
    # int8 products on the C++ GEMV, instead of the Triton kernels (passes/use_cuda_kernels.py);
    # CUDA builds through Inductor only.
    enable_cuda_kernels: bool = True
    # int8 weights that only products read stored in int8-tiles16x1024-v2, a stage of the one-row product
    # one copy (passes/tile_int8_weights.py); with the CUDA kernels only.
    int8_tiles: bool = True
    method: str = "rtn"


@dataclass(frozen=True)
class AttentionConfig:
    # Replace HF's attention (sdpa or eager matmul-softmax-matmul) by oiv2::attention, which reads
    # only the filled part of each sequence's cache.
    enable_substitution: bool = True
    # CUDA through Inductor with the C++ products: the decode programs' attention (with its rotary embedding
    # and cache writes) on the C++ kernel that copies the cache while the q/k/v product runs, where it takes
    # the shapes (passes/use_cuda_attention.py). llama-8b int4 decode on an H200: 679.7 tok/s against 651.3
    # with the Triton kernel (benchmarks/RESULTS.md, thirty-fourth session).
    enable_prefetched_decode: bool = True


@dataclass(frozen=True)
class KVCacheConfig:
    # Rewrite the captured cache writes into the in-place oiv2::kv_write op.
    enable_rewrite: bool = True


@dataclass(frozen=True)
class FusionConfig:
    # q, k and v projections as one linear over concatenated weights (passes/fuse_qkv.py).
    enable_qkv: bool = True
    # Gate and up projections as one linear, then act(gate) * up in one oiv2::gated_act (passes/fuse_ffn.py).
    enable_ffn: bool = True
    # Residual add and RMSNorm as one oiv2::add_rms_norm (passes/fuse_norms.py).
    enable_norms: bool = True
    # Rotary embedding of q and k and the two cache writes as one oiv2::rope_kv_write, where q, k and v
    # are fused (passes/fuse_rope_kv_write.py).
    enable_rope_kv_write: bool = True
    # CUDA, with the above: in the decode programs, that kernel's work inside the attention's
    # (passes/fuse_rope_into_attention.py). Alone it saves 0.6-1.6 us a layer (5.1 against 6.7 us at 129
    # positions). llama-8b decode on an H200, each form built and measured in the same call
    # (benchmarks/RESULTS.md): bf16 237.1 tok/s with it against 232.8 and 234.2 without (fb0c6d5), int8
    # 398.4 against 397.2 and 397.9 (fb0c6d5), int4 601.5 against 585.7 (f044de0). An older int8 pair
    # had it 1.2% slower (386.6 against 391.4, 537801e).
    enable_rope_into_attention: bool = True
    # Int8 and int4 on CUDA: an RMSNorm's weight folded into the linears after it, and the residual add
    # and the norm run inside the batch-1 decode products around them (passes/fold_norm_weights.py,
    # passes/fuse_norm_into_gemv.py). H100, 32 llama-8b layers of linears a step (benchmarks/RESULTS.md):
    # int8 2726 us against 2810 with the norms apart (d889441; 312.0 tok/s against 304.9 end to end),
    # int4 1868 us against 2031 (5088796).
    enable_norm_into_linear: bool = True
    # Int8 and int4 on CUDA, with the above: the gated activation inside the gate/up decode product
    # (passes/fuse_gated_act_into_gemv.py). int8, H100, the same chain: 2681 us against 2702 without
    # (5088796). int4: the gate/up weight's rows interleaved by 8; H200, 32 llama-8b layers of int4
    # products: 1469-1487 us against 1504-1510 with the activation apart (512b446).
    enable_gated_act_into_linear: bool = True


@dataclass(frozen=True)
class CudaGraphConfig:
    enable_capture: bool = True
    # Decode batch sizes captured at load; empty means powers of two up to max_batch_size (and it).
    batch_buckets: tuple[int, ...] = ()


@dataclass(frozen=True)
class BuildConfig:
    version: int = CONFIG_VERSION
    backend: Backend = Backend.INDUCTOR
    device: Device = Device.AUTO
    dtype: DType = DType.AUTO
    max_batch_size: int = 8
    # None: the smaller of 2048 and the model's max_position_embeddings.
    max_seq_len: int | None = None
    # Seed for the random weights of presets.
    seed: int = 0
    # Compare the transformed graphs with the Hugging Face model before lowering; a mismatch fails
    # the build instead of producing wrong tokens.
    enable_verification: bool = True
    # On CUDA, also compile a decode program specialised for batch 1 (matrix-vector products that
    # Inductor tunes for bandwidth); batch-1 decode steps use it.
    enable_batch1_decode: bool = True
    # Weight-only quantization of the linear layers (passes/quantize_weights.py).
    quantization: Quantization = Quantization.NONE
    quant: QuantConfig = field(default_factory=QuantConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    cuda_graphs: CudaGraphConfig = field(default_factory=CudaGraphConfig)

    def __post_init__(self) -> None:
        _validate(self)

    # ---- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        return _from_plain(cls, data)

    @classmethod
    def from_json(cls, text: str) -> BuildConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> BuildConfig:
        """A copy with `overrides` applied; a sub-config may be given as a dict of its fields."""
        merged = self.to_dict()
        for key, value in overrides.items():
            if key not in merged:
                raise ConfigError(f"Unknown build option {key!r}; known options are {sorted(merged)}.")
            if isinstance(merged[key], dict):
                value = _to_plain(value) if dataclasses.is_dataclass(value) else value
                if not isinstance(value, dict):
                    raise ConfigError(f"Build option {key!r} takes a dict of its fields.")
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = _to_plain(value)
        return BuildConfig.from_dict(merged)

    def resolve(self, *, cuda_available: bool) -> BuildConfig:
        """Turn `auto` device and dtype into the concrete choice for this machine, and drop what the
        backend cannot lower: the onnx backend builds without fuse_ffn, fuse_norms, fuse_rope_kv_write and the quantized
        embedding (their oiv2 ops have no ONNX translation yet; ONNX Runtime fuses RMSNorm and the
        residual add before it itself), and the manifest records the config as built."""
        device = self.device
        if device is Device.AUTO:
            device = Device.CUDA if cuda_available else Device.CPU
        if device is Device.CUDA and not cuda_available:
            raise ConfigError("Device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu.")
        dtype = self.dtype
        if dtype is DType.AUTO:
            dtype = DType.BFLOAT16 if device is Device.CUDA else DType.FLOAT32
        fusion, quant = self.fusion, self.quant
        if self.backend is Backend.ONNX:
            fusion = dataclasses.replace(
                fusion,
                enable_ffn=False,
                enable_norms=False,
                enable_rope_kv_write=False,
                enable_rope_into_attention=False,
                enable_norm_into_linear=False,
                enable_gated_act_into_linear=False,
            )
            quant = dataclasses.replace(quant, include_embedding=False)
        return dataclasses.replace(self, device=device, dtype=dtype, fusion=fusion, quant=quant)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def decode_buckets(self) -> tuple[int, ...]:
        if self.cuda_graphs.batch_buckets:
            return tuple(sorted(set(self.cuda_graphs.batch_buckets)))
        buckets = []
        size = 1
        while size < self.max_batch_size:
            buckets.append(size)
            size *= 2
        buckets.append(self.max_batch_size)
        return tuple(buckets)


def _validate(cfg: BuildConfig) -> None:
    if cfg.version != CONFIG_VERSION:
        raise ConfigError(
            f"Build config version {cfg.version} is not supported; this oiv2compile reads version {CONFIG_VERSION}."
        )
    if not 1 <= cfg.max_batch_size <= 1024:
        raise ConfigError(f"max_batch_size must be between 1 and 1024, not {cfg.max_batch_size}.")
    if cfg.max_seq_len is not None and not 2 <= cfg.max_seq_len <= 1 << 20:
        raise ConfigError(f"max_seq_len must be between 2 and {1 << 20}, not {cfg.max_seq_len}.")
    for bucket in cfg.cuda_graphs.batch_buckets:
        if not 1 <= bucket <= cfg.max_batch_size:
            raise ConfigError(
                f"CUDA graph batch bucket {bucket} must be between 1 and max_batch_size ({cfg.max_batch_size})."
            )
    if cfg.cuda_graphs.batch_buckets and max(cfg.cuda_graphs.batch_buckets) != cfg.max_batch_size:
        raise ConfigError("The largest CUDA graph batch bucket must equal max_batch_size.")
    if cfg.quant.group_size not in QUANT_GROUP_SIZES:
        raise ConfigError(f"quant.group_size must be one of {list(QUANT_GROUP_SIZES)}, not {cfg.quant.group_size}.")
    if cfg.quant.method not in QUANT_METHODS:
        raise ConfigError(f"quant.method must be one of {list(QUANT_METHODS)}, not {cfg.quant.method!r}.")
    if cfg.attention.enable_substitution and not cfg.kv_cache.enable_rewrite:
        raise ConfigError("Attention substitution reads the rewritten cache; enable the KV-cache rewrite too.")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(cls: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"Expected a mapping for {cls.__name__}, got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"Unknown {cls.__name__} option(s) {unknown}; known options are {sorted(known)}.")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current):
            kwargs[name] = _from_plain(type(current), value)
        elif isinstance(current, enum.Enum):
            try:
                kwargs[name] = type(current)(value)
            except ValueError:
                choices = [m.value for m in type(current)]
                raise ConfigError(f"{name} must be one of {choices}, not {value!r}.") from None
        elif isinstance(current, tuple):
            kwargs[name] = tuple(value)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, not {value!r}.")
            kwargs[name] = value
        elif name == "max_seq_len":
            kwargs[name] = None if value is None else _as_int(name, value)
        elif isinstance(current, int):
            kwargs[name] = _as_int(name, value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, not {value!r}.")
    return value
