"""kvblend's Prometheus metrics, through vLLM's KV-connector stats interface (on vLLM's own /metrics, no second
HTTP server).

Each step the worker side (store tiers, blends) and the scheduler side (matched requests) hand vLLM a `KVBlendStats`
(`get_kv_connector_stats`); vLLM sums the two, ships the payload to its API server process, and there
`KVBlendPromMetrics.observe` adds it to the Prometheus counters and histograms of `METRICS`. The payload is plain
dicts of strings and numbers ({"counts": {metric: {label: n}}, "samples": {metric: [seconds]}}): it crosses
processes as is (vLLM 0.26 ships `stats.data`, 0.32 `stats.to_dict()`, the same dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvblend.store.tier import TierStats

PREFIX = "kvblend:"
TIER_COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "evictions", "corrupt", "errors")
BLEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Metric:
    """One exported metric: a counter (exported with a _total suffix) or a histogram of seconds, with at most one
    label of its own (vLLM adds its model_name and engine labels)."""

    name: str
    doc: str
    label: str | None = None
    histogram: bool = False


METRICS = (
    Metric("tier_hits", "Store reads a tier served", "tier"),
    Metric("tier_misses", "Store reads a tier did not serve (absent, corrupt, refused, or the tier failing)", "tier"),
    Metric("tier_bytes_read", "Bytes of KV read from a tier, as the tier stores them (compressed by its codec)",
           "tier"),
    Metric("tier_bytes_written", "Bytes of KV written to a tier, as the tier stores them", "tier"),
    Metric("tier_evictions", "Entries a tier evicted (least recently used, beyond its budget)", "tier"),
    Metric("tier_corrupt", "Entries a tier found damaged, forged or of another layout (each a miss)", "tier"),
    Metric("tier_errors", "Tier operations that failed, e.g. an unreachable Redis (each a miss, never a failed "
           "request)", "tier"),
    Metric("requests", "Requests whose prompt the connector matched in the store, by mode (blend or storage)",
           "mode"),
    Metric("matched_tokens", "Prompt tokens the connector claimed from the store (vLLM does not prefill them)"),
    Metric("tokens_reused", "Chunk tokens whose stored KV a blend reused"),
    Metric("tokens_recomputed", "Chunk tokens a blend recomputed (selected by the ratio, or all on a gate "
           "fallback)"),
    Metric("blend_seconds", "Time a request's blend took (load, selection, recompute), in seconds",
           histogram=True),
    Metric("failures", "Blends and span loads that failed, by stage (vLLM recomputed their rows)", "stage"),
    Metric("gate_decisions", "The quality gate's decision per blended request (pass, raised, full_prefill)",
           "decision"),
    Metric("controller_decisions", "The loading controller's choice per blended request: the tier it loaded "
           "from (any: each chunk from the fastest holder), or recompute; per storage-mode load it decided on: "
           "storage_load or storage_recompute", "choice"),
)
_BY_NAME = {m.name: m for m in METRICS}


@dataclass
class KVBlendStats(KVConnectorStats):
    """What one side counted since vLLM last took its stats."""

    data: dict[str, Any] = field(default_factory=lambda: {"counts": {}, "samples": {}})

    def reset(self) -> None:
        self.data = {"counts": {}, "samples": {}}

    def add(self, name: str, n: float = 1, label: str = "") -> None:
        """Add `n` to counter `name` (at `label`, for a labelled one)."""
        if name not in _BY_NAME:
            raise ValueError(f"no kvblend metric {name!r}")
        if n:
            row = self.data["counts"].setdefault(name, {})
            row[label] = row.get(label, 0) + n

    def observe(self, name: str, value: float) -> None:
        """One sample of histogram `name`."""
        if name not in _BY_NAME:
            raise ValueError(f"no kvblend metric {name!r}")
        self.data["samples"].setdefault(name, []).append(value)

    def aggregate(self, other: KVConnectorStats) -> KVBlendStats:
        for name, row in other.data.get("counts", {}).items():
            for label, n in row.items():
                self.add(name, n, label)
        for name, values in other.data.get("samples", {}).items():
            self.data["samples"].setdefault(name, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        """Counter totals and histogram counts and means of the interval (vLLM's periodic log line)."""
        out: dict[str, int | float] = {}
        for name, row in self.data["counts"].items():
            for label, n in row.items():
                out[f"{name}[{label}]" if label else name] = n
        for name, values in self.data["samples"].items():
            out[f"{name}_count"] = len(values)
            out[f"{name}_mean"] = round(sum(values) / len(values), 4)
        return out

    def is_empty(self) -> bool:
        return not self.data["counts"] and not self.data["samples"]


def take(stats: KVBlendStats) -> KVBlendStats | None:
    """What `stats` holds, for vLLM (None when nothing was counted), leaving `stats` empty."""
    if stats.is_empty():
        return None
    taken = KVBlendStats(stats.data)
    stats.reset()
    return taken


def tier_deltas(stats: KVBlendStats, now: dict[str, TierStats], before: dict[str, TierStats]) -> None:
    """Add what each tier counted between the snapshots `before` and `now` (TieredStore.counters())."""
    for tier, counts in now.items():
        last = before.get(tier, TierStats())
        for counter in TIER_COUNTERS:
            stats.add(f"tier_{counter}", getattr(counts, counter) - getattr(last, counter), tier)


def blend_report(stats: KVBlendStats, report: dict) -> None:
    """Count one blended request from its report (the worker's: tokens, time, gate and controller, or the error)."""
    if "blend_error" in report:
        stats.add("failures", label="blend")
    else:
        stats.add("tokens_reused", report["tokens_reused"])
        stats.add("tokens_recomputed", report["tokens_recomputed"])
        if "gate" in report:
            stats.add("gate_decisions", label=report["gate"]["decision"])
        if "controller" in report:
            decision = report["controller"]
            stats.add("controller_decisions", label="recompute" if decision["recompute"] else decision["tier"] or "any")
    stats.observe("blend_seconds", report["blend_ms"] / 1e3)


def unregister_kvblend_metrics() -> None:
    """Drop kvblend's collectors from Prometheus' registry, as vLLM drops its own before it registers them again:
    a process that starts a second engine (tests, `LLM` restarts) would otherwise register duplicates."""
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(PREFIX):
            REGISTRY.unregister(collector)


class KVBlendPromMetrics(KVConnectorPromMetrics):
    """METRICS as Prometheus counters and histograms (names kvblend:*), fed from the stats payload."""

    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        unregister_kvblend_metrics()
        self._metrics = {}
        for m in METRICS:
            labels = labelnames + ([m.label] if m.label else [])
            if m.histogram:
                self._metrics[m.name] = self._histogram_cls(name=PREFIX + m.name, documentation=m.doc,
                                                            labelnames=labels, buckets=list(BLEND_BUCKETS))
            else:
                self._metrics[m.name] = self._counter_cls(name=PREFIX + m.name, documentation=m.doc,
                                                          labelnames=labels)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = [str(v) for v in self.per_engine_labelvalues[engine_idx]]
        for name, row in transfer_stats_data.get("counts", {}).items():
            if name in self._metrics:
                for label, n in row.items():
                    self._metrics[name].labels(*engine, *([label] if _BY_NAME[name].label else [])).inc(n)
        for name, values in transfer_stats_data.get("samples", {}).items():
            if name in self._metrics:
                histogram = self._metrics[name].labels(*engine)
                for value in values:
                    histogram.observe(value)
