"""The loading controller (CacheBlend paper §5): per request, the tier to load the chunks' KV from and the
recompute ratio, from the measured per-layer load time of each tier and the measured recompute time; and for an
exact stored prefix (storage mode), whether reading it costs less than vLLM recomputing it (`decide_storage`).

Loading layer i+1 overlaps computing layer i when a fetch thread has a core to itself (`overlap`): a layer then
costs max(load, compute), so recomputing more tokens is free up to the load time, and the ratio is raised until
compute covers the load (never below the configured ratio). Without overlap (the fetch runs in line, as on a
CPU whose cores torch's threads already hold) a layer costs load + compute, and the ratio stays as configured.
Either way, when loading costs more than recomputing every token, the controller recomputes instead of loading.
On a GPU the host's stage times are launch times (kernels run asynchronously), so there a blend's compute is timed
with CUDA events around it and folded in once the device has passed them (`observe_events`), never waited for.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch

from kvblend.blend.config import BlendConfig
from kvblend.store.entry import KVLayout
from kvblend.store.key import ChunkKey

SMOOTHING = 0.3
MAX_PENDING = 64  # GPU-timed blends awaiting their end event (the oldest are dropped past this)
COMPUTE_STAGES = ("qkv", "select", "attention", "mlp", "post_check_graphs")


def recorded_event() -> torch.cuda.Event:
    """A timing CUDA event recorded now on the current stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class MeasuredRate:
    """Seconds per unit (token-layer, token), a moving average of the newest measurements. A GPU's are timed between
    two recorded CUDA events (enable_timing) and folded in once the device has passed the second: `value` queries,
    never waits."""

    def __init__(self) -> None:
        self._value: float | None = None
        self._pending: deque = deque(maxlen=MAX_PENDING)  # (start event, end event, units)
        self._lock = threading.Lock()

    def observe(self, seconds: float, units: int) -> None:
        if units > 0:
            with self._lock:
                self._fold(seconds / units)

    def observe_events(self, start, end, units: int) -> None:
        if units > 0:
            with self._lock:
                self._pending.append((start, end, units))

    def value(self) -> float | None:
        """The average, with every measurement the device has finished folded in (None: nothing measured yet)."""
        with self._lock:
            while self._pending and self._pending[0][1].query():
                start, end, units = self._pending.popleft()
                self._fold(start.elapsed_time(end) / 1e3 / units)
            return self._value

    def _fold(self, rate: float) -> None:
        self._value = rate if self._value is None else (1 - SMOOTHING) * self._value + SMOOTHING * rate


@dataclass(frozen=True)
class StorageDecision:
    """Whether to load a request's stored exact prefix or let vLLM recompute it (`recompute`), and the estimates."""

    recompute: bool
    reason: str
    load_ms: float | None = None
    recompute_ms: float | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        for name in ("load_ms", "recompute_ms"):
            if out[name] is not None:
                out[name] = round(out[name], 3)
        return out


def decide_storage(span_tiers: Sequence[str | None], span_bytes: Sequence[int], s_per_byte: dict[str, float],
                   tokens: int, s_per_token: float | None) -> StorageDecision:
    """A storage-mode load is read before the forward that uses it, so it pays when reading every span from the
    fastest tier holding it (`span_tiers`, None: not known) costs less than vLLM recomputing its `tokens` at
    vLLM's measured prefill speed. Anything unmeasured loads (and so gets measured)."""
    if s_per_token is None:
        return StorageDecision(False, "vLLM's prefill speed not measured yet: load")
    unmeasured = sorted({t or "unknown" for t in span_tiers if t not in s_per_byte})
    if unmeasured:
        return StorageDecision(False, f"{', '.join(unmeasured)} not measured yet: load")
    load_s = sum(s_per_byte[t] * n for t, n in zip(span_tiers, span_bytes))
    recompute_s = s_per_token * tokens
    if load_s > recompute_s:
        return StorageDecision(True, "reading the stored prefix costs more than vLLM recomputing it", load_s * 1e3,
                               recompute_s * 1e3)
    return StorageDecision(False, "reading the stored prefix costs less than recomputing it", load_s * 1e3,
                           recompute_s * 1e3)


@dataclass(frozen=True)
class LoadDecision:
    """Where to load from (tier None: each chunk from the fastest tier holding it) and the recompute ratio;
    `recompute`: recompute the chunks instead of loading them (policy full_prefill)."""

    tier: str | None
    ratio: float
    reason: str
    recompute: bool = False
    load_ms_per_layer: float | None = None
    compute_ms_per_layer: float | None = None
    overlap: bool = False

    def as_dict(self) -> dict:
        out = asdict(self)
        for name in ("load_ms_per_layer", "compute_ms_per_layer"):
            if out[name] is not None:
                out[name] = round(out[name], 4)
        out["ratio"] = round(out["ratio"], 4)
        return out

    def apply(self, config: BlendConfig) -> BlendConfig:
        """The blend config this decision runs: full prefill, or the (possibly raised) ratio."""
        if self.recompute:
            return replace(config, policy="full_prefill")
        if self.ratio != config.ratio:
            return replace(config, ratio=self.ratio, schedule=None)
        return config


def decide(holders: Sequence[str], s_per_byte: dict[str, float], bytes_per_layer: int, chunk_tokens: int,
           fixed_tokens: int, s_per_token_layer: float | None, config: BlendConfig, overlap: bool) -> LoadDecision:
    """The decision for one request. `holders`: tiers holding every chunk, fastest first; `s_per_byte`: their
    measured read speed (an unmeasured tier counts as free, so it gets measured); `fixed_tokens`: tokens
    recomputed whatever the ratio (question, prefix); `s_per_token_layer`: measured compute speed."""
    ratio = config.ratio
    if not holders:
        return LoadDecision(None, ratio, "no one tier holds every chunk: each from the fastest tier holding it",
                            overlap=overlap)
    loads = [(s_per_byte.get(t, 0.0) * bytes_per_layer, t) for t in holders]
    load_s, tier = min(loads, key=lambda lt: lt[0])  # min keeps the first (fastest-ordered) tier on a tie
    if tier not in s_per_byte:
        return LoadDecision(tier, ratio, f"{tier} not measured yet: load from it", overlap=overlap)
    if s_per_token_layer is None:
        return LoadDecision(tier, ratio, "recompute time not measured yet", load_ms_per_layer=load_s * 1e3,
                            overlap=overlap)

    def compute(r: float) -> float:
        return s_per_token_layer * (fixed_tokens + r * chunk_tokens)
    full = compute(1.0)
    if (load_s > full) if overlap else (load_s + compute(ratio) >= full):
        return LoadDecision(tier, 1.0, f"loading a layer from {tier} costs more than recomputing every token",
                            True, load_s * 1e3, full * 1e3, overlap)
    if overlap and config.selects and config.schedule is None and chunk_tokens:
        hidden = (load_s / s_per_token_layer - fixed_tokens) / chunk_tokens  # the ratio whose compute = load
        if hidden > ratio:
            ratio = min(1.0, hidden)
            return LoadDecision(tier, ratio, f"ratio raised to hide the load from {tier} under compute", False,
                                load_s * 1e3, compute(ratio) * 1e3, overlap)
    return LoadDecision(tier, ratio, f"load from {tier}, configured ratio", False, load_s * 1e3,
                        compute(ratio) * 1e3, overlap)


class LoadController:
    """Keeps the measured recompute speed and asks the store for tiers and their measured read speed."""

    def __init__(self, store, layout: KVLayout, overlap: bool) -> None:
        self.store = store
        self.layout = layout
        self.overlap = overlap
        self.compute = MeasuredRate()  # the blend's seconds per token-layer

    def plan(self, keys: Sequence[ChunkKey], chunk_tokens: int, fixed_tokens: int, config: BlendConfig) -> LoadDecision:
        return decide(self.store.holders(keys), self.store.meter.seconds_per_byte(), chunk_tokens * self.layout.token_layer_bytes,
                      chunk_tokens, fixed_tokens, self.compute.value(), config, self.overlap)

    def observe(self, stage_ms: dict[str, float], token_layers: int) -> None:
        """Fold one blend's compute time (its compute stages over the token-layers it computed) into the speed."""
        self.compute.observe(sum(stage_ms.get(s, 0.0) for s in COMPUTE_STAGES) / 1e3, token_layers)

    def observe_events(self, start, end, token_layers: int) -> None:
        """One blend timed on the GPU between two recorded CUDA events (enable_timing): folded in at a later `plan`
        once the device has passed `end` (a query, not a wait)."""
        self.compute.observe_events(start, end, token_layers)
