"""The passes by name, and the ordered pipeline a config asks for.

The pipeline is an explicit list built from the config; nothing registers itself at import.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

from oiv2compile.config import Backend, BuildConfig, Device, Quantization
from oiv2compile.passes.fold_norm_weights import applies as fold_norm_applies
from oiv2compile.passes.fold_norm_weights import fold_norm_weights
from oiv2compile.passes.fuse_ffn import fuse_ffn
from oiv2compile.passes.fuse_gated_act_into_gemv import fuse_gated_act_into_gemv
from oiv2compile.passes.fuse_norm_into_gemv import fuse_norm_into_gemv
from oiv2compile.passes.fuse_norms import fuse_norms
from oiv2compile.passes.fuse_qkv import fuse_qkv
from oiv2compile.passes.fuse_rope_into_attention import fuse_rope_into_attention
from oiv2compile.passes.fuse_rope_kv_write import fuse_rope_kv_write
from oiv2compile.passes.quantize_embedding import quantize_embedding
from oiv2compile.passes.quantize_weights import quantize_weights
from oiv2compile.passes.rewrite_kv_cache import rewrite_kv_cache
from oiv2compile.passes.substitute_attention import substitute_attention
from oiv2compile.passes.tile_int8_weights import tile_int8_weights
from oiv2compile.passes.use_cuda_attention import use_cuda_attention
from oiv2compile.passes.use_cuda_kernels import use_cuda_kernels

Pass = Callable[[GraphModule, BuildConfig], int]

PASSES: dict[str, Pass] = {
    "rewrite_kv_cache": rewrite_kv_cache,
    "substitute_attention": substitute_attention,
    "fuse_qkv": fuse_qkv,
    "fuse_rope_kv_write": fuse_rope_kv_write,
    "fuse_rope_into_attention": fuse_rope_into_attention,
    "fuse_ffn": fuse_ffn,
    "fuse_norms": fuse_norms,
    "fold_norm_weights": fold_norm_weights,
    "quantize_weights": quantize_weights,
    "quantize_embedding": quantize_embedding,
    "use_cuda_kernels": use_cuda_kernels,
    "use_cuda_attention": use_cuda_attention,
    "fuse_norm_into_gemv": fuse_norm_into_gemv,
    "fuse_gated_act_into_gemv": fuse_gated_act_into_gemv,
    "tile_int8_weights": tile_int8_weights,
}


def pipeline(cfg: BuildConfig) -> list[Pass]:
    """The passes to run, in order. The cache rewrite comes first: attention reads the rewritten cache.
    The fusions come before quantization, which then quantizes the fused weights as it would the
    originals."""
    passes: list[Pass] = []
    if cfg.kv_cache.enable_rewrite:
        passes.append(rewrite_kv_cache)
    if cfg.attention.enable_substitution:
        passes.append(substitute_attention)
    if cfg.fusion.enable_qkv:
        passes.append(fuse_qkv)
        if cfg.fusion.enable_rope_kv_write:  # reads the fused projection's output
            passes.append(fuse_rope_kv_write)
            triton_attention = cfg.device is Device.CUDA and cfg.backend is Backend.INDUCTOR
            if cfg.fusion.enable_rope_into_attention and triton_attention:
                passes.append(fuse_rope_into_attention)
    if cfg.fusion.enable_ffn:
        passes.append(fuse_ffn)
    if cfg.fusion.enable_norms:
        passes.append(fuse_norms)
    if cfg.quantization is not Quantization.NONE:
        fold = cfg.fusion.enable_norms and fold_norm_applies(cfg)
        if fold:  # before quantization, which then quantizes the folded weights
            passes.append(fold_norm_weights)
        passes.append(quantize_weights)
        if cfg.quant.include_embedding:  # after the head, whose quantized tensors a tied table reuses
            passes.append(quantize_embedding)
        if cfg.quant.enable_cuda_kernels and cfg.device is Device.CUDA and cfg.backend is Backend.INDUCTOR:
            passes.append(use_cuda_kernels)
            if cfg.attention.enable_prefetched_decode and fuse_rope_into_attention in passes:
                passes.append(use_cuda_attention)  # reads which products the C++ kernels run
            if fold:  # reads the products use_cuda_kernels made
                passes.append(fuse_norm_into_gemv)
                gated = cfg.fusion.enable_ffn and cfg.fusion.enable_gated_act_into_linear
                if gated:  # after gate/up's norm
                    passes.append(fuse_gated_act_into_gemv)
            if cfg.quant.int8_tiles:  # last: the fusions read the row-major weights
                passes.append(tile_int8_weights)
    return passes
