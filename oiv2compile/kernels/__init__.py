"""Registered `oiv2::` ops, one per file: the PyTorch reference, the kernel, the registration.

Importing this package registers every op; artifacts that call them need it imported before load.
"""

from oiv2compile.kernels.add_rms_norm import add_rms_norm, add_rms_norm_ref
from oiv2compile.kernels.attention import attention, attention_ref
from oiv2compile.kernels.embedding_int4 import embedding_int4, embedding_int4_ref
from oiv2compile.kernels.embedding_int8 import embedding_int8, embedding_int8_ref
from oiv2compile.kernels.gated_act import gated_act, gated_act_ref
from oiv2compile.kernels.greedy_step import greedy_step, greedy_step_ref
from oiv2compile.kernels.kv_write import kv_write, kv_write_ref
from oiv2compile.kernels.linear_int4 import linear_int4, linear_int4_ref
from oiv2compile.kernels.linear_int4_mma import linear_int4_mma_ref
from oiv2compile.kernels.linear_int4_mma_add import linear_int4_mma_add_ref
from oiv2compile.kernels.linear_int8 import linear_int8, linear_int8_ref
from oiv2compile.kernels.linear_int8_gemm import linear_int8_gemm_ref
from oiv2compile.kernels.linear_int8_gemv import linear_int8_gemv_ref
from oiv2compile.kernels.linear_int8_gemv_add import linear_int8_gemv_add_ref
from oiv2compile.kernels.prefetched_decode_attention import prefetched_decode_attention_ref
from oiv2compile.kernels.rms_norm_linear_int4_mma import rms_norm_linear_int4_mma_ref
from oiv2compile.kernels.rms_norm_linear_int4_mma_gated_act import rms_norm_linear_int4_mma_gated_act_ref
from oiv2compile.kernels.rms_norm_linear_int8_gemv import rms_norm_linear_int8_gemv_ref
from oiv2compile.kernels.rms_norm_linear_int8_gemv_gated_act import rms_norm_linear_int8_gemv_gated_act_ref
from oiv2compile.kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref
from oiv2compile.kernels.rope_kv_write_attention import rope_kv_write_attention, rope_kv_write_attention_ref

__all__ = [
    "add_rms_norm",
    "add_rms_norm_ref",
    "attention",
    "attention_ref",
    "embedding_int4",
    "embedding_int4_ref",
    "embedding_int8",
    "embedding_int8_ref",
    "gated_act",
    "gated_act_ref",
    "greedy_step",
    "greedy_step_ref",
    "kv_write",
    "kv_write_ref",
    "linear_int4",
    "linear_int4_mma_add_ref",
    "linear_int4_mma_ref",
    "linear_int4_ref",
    "linear_int8",
    "linear_int8_gemm_ref",
    "linear_int8_gemv_add_ref",
    "linear_int8_gemv_ref",
    "linear_int8_ref",
    "prefetched_decode_attention_ref",
    "rms_norm_linear_int4_mma_gated_act_ref",
    "rms_norm_linear_int4_mma_ref",
    "rms_norm_linear_int8_gemv_gated_act_ref",
    "rms_norm_linear_int8_gemv_ref",
    "rope_kv_write",
    "rope_kv_write_attention",
    "rope_kv_write_attention_ref",
    "rope_kv_write_ref",
]
