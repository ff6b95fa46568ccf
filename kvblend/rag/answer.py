"""What a RAGPipeline query returns: the answer text, the chunks it was given, and what the prefill cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Source:
    """One retrieved chunk the answer was generated from, in prompt order."""

    chunk_id: str
    source: str
    title: str
    index: int
    score: float | None = None


@dataclass(frozen=True)
class QueryStats:
    """TTFT and token counts from vLLM, and the kvblend connector's report (zeros when it did not blend;
    `error` says why a blend or load failed, in which case vLLM recomputed those tokens itself)."""

    ttft_ms: float | None
    prompt_tokens: int
    num_cached_tokens: int
    generated_tokens: int
    mode: str = "plain"
    chunks: int = 0
    tokens_reused: int = 0
    tokens_recomputed: int = 0
    recompute_ratio: float | None = None
    blend_ms: float | None = None
    hits: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryResult:
    question: str
    answer: str
    sources: list[Source]
    stats: QueryStats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ttft_ms(metrics) -> float | None:
    """Prefill time of one request: the engine's first_token_ts - scheduled_ts, else its first-token latency."""
    if metrics is None:
        return None
    first, scheduled = getattr(metrics, "first_token_ts", 0.0), getattr(metrics, "scheduled_ts", 0.0)
    if first and scheduled:
        return (first - scheduled) * 1e3
    latency = getattr(metrics, "first_token_latency", 0.0)
    return latency * 1e3 if latency else None


def query_stats(output, prompt_tokens: int, generated_tokens: int) -> QueryStats:
    """QueryStats of a finished vLLM RequestOutput."""
    report = dict((output.kv_transfer_params or {}).get("kvblend") or {})
    return QueryStats(
        ttft_ms=ttft_ms(output.metrics),
        prompt_tokens=prompt_tokens,
        num_cached_tokens=int(output.num_cached_tokens or 0),
        generated_tokens=generated_tokens,
        mode=report.get("mode", "plain"),
        chunks=int(report.get("chunks", 0)),
        tokens_reused=int(report.get("tokens_reused", 0)),
        tokens_recomputed=int(report.get("tokens_recomputed", 0)),
        recompute_ratio=report.get("recompute_ratio"),
        blend_ms=report.get("blend_ms"),
        hits=dict(report.get("hits", {})),
        error=report.get("blend_error") or report.get("load_error"),
        report=report,
    )
