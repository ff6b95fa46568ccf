"""ConnectorConfig: kvblend's settings inside vLLM, read from `kv_connector_extra_config`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

from kvblend.blend.config import DEFAULT_POLICY, DEFAULT_RATIO, BlendConfig
from kvblend.blend.gate import DEFAULT_GATE_BOUND
from kvblend.store.key import DEFAULT_NAMESPACE, check_namespace_name
from kvblend.store.redis_tier import DEFAULT_TIMEOUT_S, redact_url, redacted_repr
from kvblend.store.tiered import DEFAULT_DISK_GB, DEFAULT_MEMORY_GB, DEFAULT_REDIS_GB, StoreConfig

log = logging.getLogger(__name__)
MODES = ("blend", "storage")
# What `kvblend serve --redis` and RAGPipeline name in redis_url_env: the engine reads the URL from it.
ENGINE_REDIS_URL_ENV = "KVBLEND_ENGINE_REDIS_URL"
CPU_OPS = ("vllm", "torch")
BLEND_ATTENTION = ("auto", "vllm", "kvblend")


@dataclass(frozen=True)
class ConnectorConfig:
    """mode "storage": exact reuse of prefix-chained spans (like a KV offload tier, but shared through the
    store); mode "blend": the same, plus CacheBlend of cached chunks found anywhere in the prompt, for requests
    that carry kvblend parameters. A request carrying none (a plain OpenAI client) asked for nothing
    approximate: it gets storage mode (exact) unless `discover_blend` is on, which blends it too, with chunks
    discovered by content hash (`discover`), trading exact answers for its prefill time.
    prefetch: as soon as the worker receives a step's load and blend jobs, start moving all their entries whole
    into the memory tier in the background (the layer reads wait for it rather than read twice).
    controller: per blended request, pick the tier to load from and a recompute ratio (never below `ratio`)
    from measured load and recompute times (kvblend.blend.controller); per storage-mode load, leave it to vLLM
    when reading it costs more than vLLM's measured prefill of its tokens (with kv_load_failure_policy
    "recompute"); its decision is in the request report.
    cpu_ops "vllm": on a CPU engine the chunks' rope shift runs on vLLM's C++ rotary kernel; "torch": on
    kvblend's torch references. blend_attention: how a blend's active rows attend, "auto" (kvblend's sparse-query
    kernel on a GPU, vLLM's backend on a CPU: kvblend.vllm.paged_target), "vllm" or "kvblend". blend_cuda_graphs:
    where vLLM runs CUDA graphs, a blend's layers after its last check layer replay as CUDA graphs too (on one GPU,
    with kvblend's attention; kvblend.blend.cuda_graphs). Store and blend
    settings default to StoreConfig's and BlendConfig's; None check_layers means BlendConfig's; gate_bound None
    turns the quality gate's fallback to full prefill off, gate_raise (None by default) opts in to its raise to
    twice the ratio (kvblend.blend.gate). `redis_url_env` names an environment variable holding the Redis URL, so
    a password stays out of vLLM's logged config; `require_tenant`: requests without a tenant secret neither read
    nor write the store. `codecs`: storage codecs of tiers, over StoreConfig's defaults (e.g. {"redis": "fp8"})."""

    mode: str = "blend"
    store_dir: str | None = None
    disk_gb: float = DEFAULT_DISK_GB
    memory_gb: float = DEFAULT_MEMORY_GB
    redis_url: str | None = None
    redis_url_env: str | None = None
    redis_timeout_s: float = DEFAULT_TIMEOUT_S
    directory_url: str | None = None
    redis_gb: float = DEFAULT_REDIS_GB
    redis_ttl_s: int | None = None
    disk: bool = True
    codecs: dict[str, str] | None = None
    namespace: str = DEFAULT_NAMESPACE
    require_tenant: bool = False
    span_tokens: int = 256
    extract: bool = True
    discover: bool = True
    discover_blend: bool = False
    min_chunk_tokens: int = 32
    policy: str = DEFAULT_POLICY
    ratio: float = DEFAULT_RATIO
    check_layers: tuple[int, ...] | None = None
    gate_bound: float | None = DEFAULT_GATE_BOUND
    gate_raise: float | None = None
    self_check: bool = True
    cpu_ops: str = "vllm"
    blend_attention: str = "auto"
    blend_cuda_graphs: bool = True
    prefetch: bool = True
    controller: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"kvblend connector mode must be one of {MODES}, got {self.mode!r}")
        if self.cpu_ops not in CPU_OPS:
            raise ValueError(f"kvblend connector cpu_ops must be one of {CPU_OPS}, got {self.cpu_ops!r}")
        if self.blend_attention not in BLEND_ATTENTION:
            raise ValueError(f"kvblend connector blend_attention must be one of {BLEND_ATTENTION}, got "
                             f"{self.blend_attention!r}")
        if self.span_tokens <= 0 or self.min_chunk_tokens <= 0:
            raise ValueError("span_tokens and min_chunk_tokens must be positive")
        if self.redis_url is not None and self.redis_url_env is not None:
            raise ValueError("give the Redis URL as redis_url or through redis_url_env, not both")
        if self.redis_url_env is not None and not os.environ.get(self.redis_url_env):
            raise ValueError(f"redis_url_env names {self.redis_url_env}, which is not set in the environment")
        if self.discover_blend and not self.discover:
            raise ValueError("discover_blend blends requests through discovery; it needs discover on")
        check_namespace_name(self.namespace)
        self.blend_config()
        self.store_config()

    @classmethod
    def from_extra(cls, extra: dict | None) -> ConnectorConfig:
        """Parse `kv_connector_extra_config`; unknown keys are an error (a typo must not pass silently)."""
        extra = dict(extra or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - names)
        if unknown:
            raise ValueError(f"unknown kvblend connector settings {unknown}; known: {sorted(names)}")
        if "check_layers" in extra:
            extra["check_layers"] = tuple(int(x) for x in extra["check_layers"])
        url = extra.get("redis_url")
        if isinstance(url, str) and redact_url(url) != url:
            log.warning("kv_connector_extra_config holds a Redis URL with a password (%s), and vLLM logs that config "
                        "at start-up: put the URL in an environment variable and name it in redis_url_env instead "
                        "(`kvblend serve --redis URL` does so through %s)", redact_url(url), ENGINE_REDIS_URL_ENV)
        return cls(**extra)

    def request_mode(self, asked: bool) -> str:
        """The mode of a request that sets none: the connector's if it carries kvblend parameters (`asked`), else
        storage (exact) unless discover_blend."""
        return self.mode if asked or self.discover_blend else "storage"

    def store_config(self, ranks: int = 1) -> StoreConfig:
        """The store's settings; `ranks` tensor-parallel workers each hold a memory tier of 1/ranks of memory_gb
        (every rank's shard counts against the one budget)."""
        url = os.environ[self.redis_url_env] if self.redis_url_env is not None else self.redis_url
        return StoreConfig.from_settings(self.store_dir, self.memory_gb / ranks, self.disk_gb, url,
                                         self.redis_timeout_s, self.redis_gb, self.redis_ttl_s, self.disk,
                                         self.directory_url, self.codecs)

    def blend_config(self, policy: str | None = None, ratio: float | None = None,
                     gate_bound: float | str | None = None, gate_raise: float | str | None = None) -> BlendConfig:
        """BlendConfig's defaults, with this connector's (and the request's) policy, ratio, check layers and
        quality gate bounds (a request's "off": that bound off)."""
        extra = {} if self.check_layers is None else {"check_layers": self.check_layers}
        return BlendConfig(policy=policy or self.policy, ratio=self.ratio if ratio is None else ratio,
                           gate_bound=_asked(self.gate_bound, gate_bound),
                           gate_raise=_asked(self.gate_raise, gate_raise), **extra)

    def __repr__(self) -> str:
        return redacted_repr(self)


def _asked(own: float | None, asked: float | str | None) -> float | None:
    """A request's gate bound over the connector's: None keeps the connector's, "off" turns it off."""
    return own if asked is None else None if asked == "off" else asked
