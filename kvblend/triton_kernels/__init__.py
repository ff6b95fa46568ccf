"""Triton kernels of the blend path, each beside its torch reference; backend="auto" picks Triton for CUDA tensors.

Imports with torch alone: without triton every op runs its torch reference.
"""

from kvblend.triton_kernels.dispatch import BACKENDS, HAS_TRITON
from kvblend.triton_kernels.kv_deviation import kv_deviation, kv_deviation_ref
from kvblend.triton_kernels.paged_kv import (
    LAYOUTS,
    paged_kv_read,
    paged_kv_read_ref,
    paged_kv_write,
    paged_kv_write_ref,
)
from kvblend.triton_kernels.rms_norm import rms_norm, rms_norm_ref
from kvblend.triton_kernels.rope_qk import rope_qk, rope_qk_ref
from kvblend.triton_kernels.rope_shift import rope_shift_gather, rope_shift_gather_ref
from kvblend.triton_kernels.silu_mul import silu_mul, silu_mul_fused, silu_mul_ref
from kvblend.triton_kernels.sparse_attention import (
    AttentionBands,
    attention_bands,
    sparse_query_attention,
    sparse_query_attention_ref,
)

__all__ = [
    "AttentionBands",
    "BACKENDS",
    "HAS_TRITON",
    "LAYOUTS",
    "attention_bands",
    "kv_deviation",
    "kv_deviation_ref",
    "paged_kv_read",
    "paged_kv_read_ref",
    "paged_kv_write",
    "paged_kv_write_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_qk",
    "rope_qk_ref",
    "rope_shift_gather",
    "rope_shift_gather_ref",
    "silu_mul",
    "silu_mul_fused",
    "silu_mul_ref",
    "sparse_query_attention",
    "sparse_query_attention_ref",
]
