"""PipelineConfig: every setting of a RAGPipeline, validated at construction, before any model or engine loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvblend.blend.config import DEFAULT_POLICY, DEFAULT_RATIO, BlendConfig
from kvblend.blend.gate import DEFAULT_GATE_BOUND
from kvblend.blend.prompt import DEFAULT_SEPARATOR, DEFAULT_SYSTEM
from kvblend.cpu import cpu_compute_dtype
from kvblend.paths import cache_dir
from kvblend.retrieval.chunker import ChunkerConfig
from kvblend.store.key import DEFAULT_NAMESPACE, TENANT_SECRET_ENV, check_tenant_secret, key_namespace
from kvblend.store.redis_tier import redact_url, redacted_repr
from kvblend.store.tiered import DEFAULT_DISK_GB, DEFAULT_MEMORY_GB, DEFAULT_REDIS_GB, StoreConfig, default_store_dir
from kvblend.transport.redis_client import RedisConnection, redis_errors
from kvblend.vllm.config import ENGINE_REDIS_URL_ENV

# Sane vLLM settings for the embedded model on CPU; `disable_log_stats=False` keeps per-request TTFT metrics. The
# dtype is this CPU's compute dtype (bf16 only with native bf16, else fp32: kvblend.cpu); every kvblend precompute
# path defaults to it too, so stored chunk KV and the serving engine agree. engine_args={"dtype": ...} overrides it.
# Async scheduling off: the kvblend connector refuses it (vLLM on a GPU turns it on by default).
DEFAULT_ENGINE_ARGS: dict[str, Any] = {"dtype": cpu_compute_dtype(), "max_model_len": 4096, "enforce_eager": True,
                                       "max_num_seqs": 4, "enable_prefix_caching": True, "disable_log_stats": False,
                                       "async_scheduling": False}
# Greedy with a frequency penalty: without one the embedded 135M model loops ("a lambda expression is a function
# definition, while a function definition is a function definition ..."), plain and blended alike. A penalty on
# generated tokens only: repetition_penalty also penalises the prompt's tokens, which pushes a RAG answer away from
# its documents (measured: examples/serve.md). RAGPipeline's queries and `kvblend serve` start from it;
# PipelineConfig(sampling=...), a query's keywords, `kvblend serve --sampling` or an API request override it.
DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.0, "frequency_penalty": 0.5}
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

    model_dir None is the embedded SmolLM2; `sampling` are the SamplingParams fields every query starts from
    (DEFAULT_SAMPLING; a query's own keywords win); index_dir and store_dir default to `default_index_dir()` and
    `default_store_dir()`; `engine_args` are merged over DEFAULT_ENGINE_ARGS and passed to `vllm.LLM` (the KV
    space is sized by kvblend.rag.kv_space unless they set it). The store and blend settings default to
    StoreConfig's and BlendConfig's, and are validated by them (`gate_bound` None: the quality gate's fallback to full prefill off; `gate_raise`: its opt-in raise). `tenant_secret` (default: KVBLEND_TENANT_SECRET)
    keeps this pipeline's chunk KV in its tenant's own namespace, reachable only with the same secret.
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
    gate_bound: float | None = DEFAULT_GATE_BOUND
    gate_raise: float | None = None
    top_k: int = 4
    chunk_tokens: int = ChunkerConfig.chunk_tokens
    namespace: str = DEFAULT_NAMESPACE
    tenant_secret: str | None = field(default_factory=lambda: os.environ.get(TENANT_SECRET_ENV), repr=False)
    system_prompt: str = DEFAULT_SYSTEM
    separator: str = DEFAULT_SEPARATOR
    max_tokens: int = 128
    sampling: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_dir", Path(self.index_dir or default_index_dir()))
        object.__setattr__(self, "store_dir", Path(self.store_dir or default_store_dir()))
        StoreConfig.from_settings(self.store_dir, self.memory_gb, self.disk_gb, self.redis_url,
                                  redis_gb=self.redis_gb, redis_ttl_s=self.redis_ttl_s)
        BlendConfig(policy=self.policy, ratio=self.ratio, gate_bound=self.gate_bound, gate_raise=self.gate_raise)
        key_namespace(self.namespace)
        if self.tenant_secret is not None:
            check_tenant_secret(self.tenant_secret)
        if self.top_k <= 0 or self.chunk_tokens <= 0 or self.max_tokens <= 0:
            raise ValueError(f"top_k, chunk_tokens and max_tokens must be positive, got {self.top_k}, "
                             f"{self.chunk_tokens} and {self.max_tokens}")
        if not isinstance(self.sampling, dict) or {"extra_args", "max_tokens"} & set(self.sampling):
            raise ValueError("sampling must be a dict of SamplingParams fields other than extra_args and max_tokens "
                             "(max_tokens is its own setting)")
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
        """`kv_connector_extra_config` of the kvblend connector (see kvblend.vllm.config.ConnectorConfig); the
        Redis URL goes through ENGINE_REDIS_URL_ENV (set by `start_llm`), never into vLLM's logged config."""
        redis = {"redis_url_env": ENGINE_REDIS_URL_ENV} if self.redis_url else {}
        return {"mode": "blend", "store_dir": str(self.store_dir), **redis, "namespace": self.namespace,
                "policy": self.policy, "ratio": self.ratio, "gate_bound": self.gate_bound,
                "gate_raise": self.gate_raise, "memory_gb": self.memory_gb, "disk_gb": self.disk_gb,
                "redis_gb": self.redis_gb, "redis_ttl_s": self.redis_ttl_s}

    def store_config(self) -> StoreConfig:
        """The same persistent tiers the connector uses, for checks and stats in this process (small memory tier)."""
        return StoreConfig.from_settings(self.store_dir, VIEW_MEMORY_GB, self.disk_gb, self.redis_url,
                                         redis_gb=self.redis_gb, redis_ttl_s=self.redis_ttl_s)

    def key_namespace(self) -> str:
        """The namespace this pipeline's chunk keys are made in: its tenant's when it has a tenant secret (keyed
        with the deployment secret, as the connector does)."""
        return key_namespace(self.namespace, self.tenant_secret, self.store_config().secret)

    def __repr__(self) -> str:
        return redacted_repr(self)


def require_redis(url: str, timeout_s: float = 2.0) -> None:
    """Raise RedisUnreachable unless the Redis server at `url` answers PING within `timeout_s` (a cluster: unless
    one of its nodes tells its slots)."""
    connection = RedisConnection(url, timeout_s, retry_s=0.0)
    try:
        client = connection.get()
        if not connection.cluster:
            client.ping()
    except redis_errors() as exc:
        raise RedisUnreachable(f"Redis at {redact_url(url)} is unreachable ({exc}); start it or leave out the Redis "
                               "URL") from exc
    finally:
        connection.close()
