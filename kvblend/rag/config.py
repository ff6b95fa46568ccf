"""PipelineConfig: every setting of a RAGPipeline, validated at construction, before any model or engine loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvblend.blend.config import DEFAULT_POLICY, DEFAULT_RATIO, BlendConfig
from kvblend.blend.prompt import DEFAULT_SYSTEM
from kvblend.paths import cache_dir
from kvblend.store.key import DEFAULT_NAMESPACE, ChunkKey
from kvblend.store.tiered import DEFAULT_DISK_GB, DEFAULT_MEMORY_GB, DEFAULT_REDIS_GB, StoreConfig, default_store_dir

# Sane vLLM settings for the embedded model on CPU; `disable_log_stats=False` keeps per-request TTFT metrics.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {"dtype": "bfloat16", "max_model_len": 4096, "enforce_eager": True,
                                       "max_num_seqs": 4, "enable_prefix_caching": True, "disable_log_stats": False}
PIPELINE_OWNED_ARGS = ("model", "kv_transfer_config", "load_format")
VIEW_MEMORY_GB = 1 / 16  # this process's view of the store only checks presence and reads stats


def default_index_dir() -> Path:
    """The vector index's directory unless one is given: cache_dir()/"index"."""
    return cache_dir() / "index"


class RedisUnreachable(RuntimeError):
    """The configured Redis tier does not answer; the message names the URL."""


@dataclass(frozen=True)
class PipelineConfig:
    """Model, index, chunk KV store, blend and retrieval settings of a RAGPipeline.

    model_dir None is the embedded SmolLM2; index_dir and store_dir default to `default_index_dir()` and
    `default_store_dir()`; `engine_args` are merged over DEFAULT_ENGINE_ARGS and passed to `vllm.LLM`. The store
    and blend settings default to StoreConfig's and BlendConfig's, and are validated by them.
    """

    model_dir: str | os.PathLike | None = None
    index_dir: str | os.PathLike | None = None
    store_dir: str | os.PathLike | None = None
    redis_url: str | None = None
    memory_gb: float = DEFAULT_MEMORY_GB
    disk_gb: float = DEFAULT_DISK_GB
    redis_gb: float = DEFAULT_REDIS_GB
    redis_ttl_s: int | None = None
    policy: str = DEFAULT_POLICY
    ratio: float = DEFAULT_RATIO
    top_k: int = 4
    chunk_tokens: int = 512
    namespace: str = DEFAULT_NAMESPACE
    system_prompt: str = DEFAULT_SYSTEM
    separator: str = "\n\n"
    max_tokens: int = 128
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_dir", Path(self.index_dir or default_index_dir()))
        object.__setattr__(self, "store_dir", Path(self.store_dir or default_store_dir()))
        StoreConfig.from_settings(self.store_dir, self.memory_gb, self.disk_gb, self.redis_url,
                                  redis_gb=self.redis_gb, redis_ttl_s=self.redis_ttl_s)
        BlendConfig(policy=self.policy, ratio=self.ratio)
        ChunkKey.alone("config-check", (0,), self.namespace)
        if self.top_k <= 0 or self.chunk_tokens <= 0 or self.max_tokens <= 0:
            raise ValueError(f"top_k, chunk_tokens and max_tokens must be positive, got {self.top_k}, "
                             f"{self.chunk_tokens} and {self.max_tokens}")
        owned = sorted(set(self.engine_args) & set(PIPELINE_OWNED_ARGS))
        if owned:
            raise ValueError(f"engine_args must not set {owned}: the pipeline sets them (use model_dir)")
        max_len = self.max_model_len
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"engine_args max_model_len must be a positive int, got {max_len!r}")
        if self.top_k * self.chunk_tokens + self.max_tokens >= max_len:
            raise ValueError(f"top_k {self.top_k} x chunk_tokens {self.chunk_tokens} + max_tokens {self.max_tokens} "
                             f"does not fit max_model_len {max_len}; lower one of them")

    @property
    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM` besides the model and the connector."""
        return {**DEFAULT_ENGINE_ARGS, **self.engine_args}

    @property
    def max_model_len(self) -> int:
        return self.engine_kwargs["max_model_len"]

    @property
    def dtype(self) -> str:
        return str(self.engine_kwargs["dtype"])

    def connector_extra(self) -> dict[str, Any]:
        """`kv_connector_extra_config` of the kvblend connector (see kvblend.vllm.config.ConnectorConfig)."""
        return {"mode": "blend", "store_dir": str(self.store_dir), "redis_url": self.redis_url,
                "namespace": self.namespace, "policy": self.policy, "ratio": self.ratio,
                "memory_gb": self.memory_gb, "disk_gb": self.disk_gb, "redis_gb": self.redis_gb,
                "redis_ttl_s": self.redis_ttl_s}

    def store_config(self) -> StoreConfig:
        """The same persistent tiers the connector uses, for checks and stats in this process (small memory tier)."""
        return StoreConfig.from_settings(self.store_dir, VIEW_MEMORY_GB, self.disk_gb, self.redis_url,
                                         redis_gb=self.redis_gb, redis_ttl_s=self.redis_ttl_s)


def require_redis(url: str, timeout_s: float = 2.0) -> None:
    """Raise RedisUnreachable unless the Redis server at `url` answers PING within `timeout_s`."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        raise RedisUnreachable(f"Redis at {url} is unreachable ({exc}); start it or leave out the Redis URL") from exc
    finally:
        client.close()
