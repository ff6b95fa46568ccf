"""What the scheduler-side connector tells the worker each step, and what the worker reports back."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvblend.blend.config import BlendConfig
from kvblend.store.key import WHOLE, ChunkKey


@dataclass(frozen=True)
class Span:
    """Prompt rows [start, start + length) whose KV is the stored entry `key` (computed at base `start`)."""

    start: int
    length: int
    key: ChunkKey

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class LoadJob:
    """Storage mode: copy exact prefix-chained spans into the request's blocks, rows [write_from, end)."""

    req_id: str
    block_ids: list[int]
    spans: list[Span]
    write_from: int
    prefetch: bool = True


@dataclass
class BlendJob:
    """Blend mode: compute the KV of prompt rows [num_computed, len(prompt) - 1) with the blend engine."""

    req_id: str
    prompt: list[int]
    block_ids: list[int]
    num_computed: int
    exact_spans: list[Span]
    chunks: list[Span]
    config: BlendConfig
    prefetch: bool = True
    profile: bool = False  # device-timed stages (RequestParams.profile)


@dataclass
class SaveJob:
    """Extraction: store the KV of these spans of a prompt vLLM has just prefilled itself."""

    req_id: str
    prompt: list[int]
    block_ids: list[int]
    spans: list[Span]


@dataclass
class KVBlendMetadata(KVConnectorMetadata):
    """A step's jobs, keyed by the whole KV of each span (every rank gets the same)."""

    loads: list[LoadJob] = field(default_factory=list)
    blends: list[BlendJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    check: SaveJob | None = None
    step_tokens: int = 0  # tokens vLLM computes in this step (the worker times its prefill speed by them)

    def for_shard(self, shard: str) -> "KVBlendMetadata":
        """The same jobs on the store entries of one tensor-parallel rank's `shard` of the KV."""
        if shard == WHOLE:
            return self

        def on(spans: list[Span]) -> list[Span]:
            return [replace(s, key=s.key.for_shard(shard)) for s in spans]

        return KVBlendMetadata(loads=[replace(j, spans=on(j.spans)) for j in self.loads],
                               blends=[replace(j, exact_spans=on(j.exact_spans), chunks=on(j.chunks)) for j in self.blends],
                               saves=[replace(j, spans=on(j.spans)) for j in self.saves], check=self.check,
                               step_tokens=self.step_tokens)


STORE_FIELDS = frozenset({"stored_spans", "store_ms"})  # a worker report of storing alone (no load, no blend)


@dataclass
class KVBlendWorkerMeta(KVConnectorWorkerMetadata):
    """Self-check verdict (None until decided), per-request blend reports, and the entries this step stored
    (key, and token ids for chunks computed alone) so the scheduler knows of them before the store's
    background writer has made them visible to other processes."""

    blend_ready: bool | None = None
    reason: str = ""
    check_report: dict | list[dict] | None = None  # one rank's, or every rank's (`aggregate`)
    reports: dict[str, dict] = field(default_factory=dict)
    stored: list[tuple[ChunkKey, list[int] | None]] = field(default_factory=list)

    def aggregate(self, other: "KVBlendWorkerMeta") -> "KVBlendWorkerMeta":
        """Two tensor-parallel ranks' metadata as one: blending is ready only if every rank's self-check passed;
        each request's reports and the self-check reports (a list, by rank) are joined."""
        verdicts = [v for v in (self.blend_ready, other.blend_ready) if v is not None]
        reports = {req: {**self.reports.get(req, {}), **other.reports.get(req, {})}
                   for req in {**self.reports, **other.reports}}
        checks = [r for c in (self.check_report, other.check_report) if c for r in (c if isinstance(c, list) else [c])]
        return KVBlendWorkerMeta(
            blend_ready=None if not verdicts else all(verdicts),
            reason="; ".join(r for r in (self.reason, other.reason) if r),
            check_report=checks or None,
            reports=reports,
            stored=self.stored + other.stored,
        )
