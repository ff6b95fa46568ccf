"""Worker side of the connector: load stored spans layer by layer, run the blend engine, extract KV, self-check.

Everything here runs inside vLLM's worker process, on the tensors vLLM allocated: the blend runs on vLLM's own
loaded modules (reached through the "kvblend" load format, `kvblend.vllm.model_hook`) and writes and attends
through vLLM's paged cache and attention backend (`PagedKV`). A failure never fails the request: its blocks are
reported as not loaded and vLLM recomputes them (kv_load_failure_policy="recompute").

Under tensor parallelism every rank runs this on its own KV heads (`spec` is the rank's share, `shard` names its
store entries) with the same jobs; whatever decides the control flow (a load that failed, the token selection) is
agreed over vLLM's TP group, so no rank waits alone in a collective and none keeps KV another rank recomputes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import torch

from kvblend.blend.controller import LoadController, MeasuredRate, decide_storage, recorded_event
from kvblend.blend.cuda_graphs import PostCheckGraphs
from kvblend.blend.engine import BlendEngine
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.blend.source import ChunkLoadError, TensorLayerSource, background_fetch_pays, kv_layout
from kvblend.model.ops import DEFAULT_OPS, ModelOps
from kvblend.model.spec import ModelSpec
from kvblend.store.entry import ChunkKV
from kvblend.store.key import WHOLE, ChunkKey
from kvblend.store.tiered import TieredStore
from kvblend.vllm.compat import blend_metadata_builder
from kvblend.vllm.metadata import BlendJob, KVBlendMetadata, KVBlendWorkerMeta, LoadJob, SaveJob
from kvblend.vllm.metrics import KVBlendStats, blend_report, take, tier_deltas
from kvblend.vllm.model_hook import LOAD_FORMAT, served_model
from kvblend.vllm.model_view import VllmModelView
from kvblend.vllm.paged import PagedCache, slots_for
from kvblend.vllm.paged_target import BLEND_BACKENDS, PagedKV, attention_path
from kvblend.vllm.save_queue import SaveQueue, save_groups
from kvblend.vllm.self_check import self_check
from kvblend.vllm.tensor_parallel import tp_sum

log = logging.getLogger(__name__)
T = TypeVar("T")
PREFILL_MIN_TOKENS = 512  # steps computing fewer tokens (decodes, a blend's last token) say little of prefill speed


def layer_index(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    if match is None:
        raise ValueError(f"cannot tell the layer index of attention layer {name!r}")
    return int(match.group(1))


def blocks_from(block_ids: list[int], start: int, block_size: int) -> set[int]:
    """The request's blocks holding rows at or after `start`."""
    return set(block_ids[start // block_size :])


@dataclass
class _SpanLoad:
    """A storage-mode load: its spans' whole entries, read at its first layer (None until then), and on a packed
    GPU cache (made at its first layer) their layer source, the rows of its staging it writes and their slots."""

    job: LoadJob
    entries: list[ChunkKV] | None = None
    failed: bool = False
    source: TensorLayerSource | None = None
    kept: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    @cached_property
    def rows(self) -> list[tuple[int, int, ChunkKV, slice]]:
        """(first, end, entry, kept) per span: the prompt rows [first, end) it writes (from `write_from` on), its
        entry and the entry's rows that hold them (once its entries are read)."""
        parts = []
        for span, entry in zip(self.job.spans, self.entries):
            first = max(span.start, self.job.write_from)
            parts.append((first, span.end, entry, slice(first - span.start, span.length)))
        return parts


class WorkerSide:
    def __init__(self, spec: ModelSpec, vllm_config, kv_cache_config, store: TieredStore, layers: dict,
                 blend: bool, cpu_ops: str = "vllm", controller: bool = True, layerwise_loads: bool = True,
                 shard: str = WHOLE, tp_world: int = 1, blend_attention: str = "auto",
                 cuda_graphs: bool = False) -> None:
        """`spec`: the model as this rank holds it (`rank_spec`), `shard` its store shard, `tp_world` the number
        of tensor-parallel ranks (the loading controller is off under TP: its timings differ by rank).
        `layerwise_loads`: write a storage-mode load's rows layer by layer as vLLM's forward reaches each layer
        (`wait_layer`); off (vLLM may replay whole-model CUDA graphs, where no layer hook runs), all layers are
        written before the forward (`start_load`). `blend_attention`: ConnectorConfig's, resolved by
        `attention_path` once the caches are known. `cuda_graphs`: replay a blend's layers after its last check
        layer as CUDA graphs where they attend with kvblend's kernel on one GPU (vLLM's own graphs are on and
        ConnectorConfig's blend_cuda_graphs)."""
        self.spec, self.vllm_config, self.kv_cache_config = spec, vllm_config, kv_cache_config
        self.shard, self.tp_world = shard, tp_world
        self.block_size = vllm_config.cache_config.block_size
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.blend_wanted, self.cpu_ops = blend, cpu_ops
        self.store = store
        self.attention_layers = layers
        self.caches: list[PagedCache] = []
        self.failed_blocks: set[int] = set()
        self._engine: BlendEngine | None = None
        self.controller_wanted = controller and tp_world == 1
        self.layerwise_loads = layerwise_loads
        self.controller: LoadController | None = None
        self._builder = None
        self.blend_attention = blend_attention
        self.cuda_graphs_wanted = cuda_graphs
        self.attention = "vllm"  # how blends attend: attention_path(blend_attention), set with the blend engine
        self._loads: list[_SpanLoad] = []
        self._verdict: tuple[bool, str] | None = None
        self.check_report: dict | None = None
        self._reports: dict[str, dict] = {}
        self._stored: list[tuple[ChunkKey, list[int] | None]] = []
        self._stored_lock = threading.Lock()  # SaveQueue's thread appends, worker_meta takes
        self._saver: SaveQueue | None = None  # on a GPU: stores off the critical path
        self.stats = KVBlendStats()  # blends and the store's tiers, for vLLM's /metrics
        self._counted = store.counters()  # the tiers' counters as last reported
        # vLLM's own prefill speed (seconds per token), for storage-mode decisions (`_declined`): each forward of
        # PREFILL_MIN_TOKENS or more that loads nothing during it, timed from its first layer's attention hook to
        # its last's (`wait_layer`, `layer_saved`; CUDA events on a GPU). vLLM 0.32 calls start_load_kv after the
        # forward in steps without a synchronous load, so the step-level hooks do not bracket it.
        self.prefill = MeasuredRate()
        self._step: tuple[int, object] | None = None  # (tokens, start mark) of the forward being timed
        self._layer_names: list[str] = []
        # a declined load is reported as failed so that vLLM recomputes it: only where that is what vLLM does
        self._may_decline = vllm_config.kv_transfer_config.kv_load_failure_policy == "recompute"

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ordered = sorted(kv_caches.items(), key=lambda item: layer_index(item[0]))
        self.caches = [PagedCache(self.attention_layers[name], kv, self.block_size, self.num_kv_heads, self.head_dim)
                       for name, kv in ordered]
        self._layer_names = [name for name, _ in ordered]
        device = self.caches[0].kv.device
        if device.type == "cuda":
            self._saver = SaveQueue(device, self._put)
        if self.blend_wanted:
            try:
                self._engine = self._blend_engine()
                if self.controller_wanted:
                    self.controller = LoadController(self.store, kv_layout(self.spec),
                                                     background_fetch_pays(self.caches[0].kv.device))
            except Exception as exc:  # no hook, an unsupported model or backend: storage mode, said once
                reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                self._verdict = (False, reason)
                log.warning("kvblend: blending off, requests are served as storage mode / plain vLLM: %s", reason)

    def _blend_engine(self) -> BlendEngine:
        """The blend engine on vLLM's own loaded model and attention backend (no weights of its own)."""
        model = served_model()
        if model is None:
            raise ValueError(f"blend mode needs vLLM's loaded model: start vLLM with load_format={LOAD_FORMAT!r} "
                             f"(`vllm serve --load-format {LOAD_FORMAT}`), which the kvblend plugin registers")
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1 or len(groups[0].layer_names) != len(self.caches):
            raise ValueError(f"blend needs one KV cache group holding every layer, got {len(groups)} groups")
        first = self.caches[0].layer
        if first.attn_backend.get_name() not in BLEND_BACKENDS:
            raise ValueError(f"the blend attends through vLLM's {', '.join(BLEND_BACKENDS)} backends, not "
                             f"{first.attn_backend.get_name()} (start vLLM with attention_backend='FLASH_ATTN' on a GPU)")
        self._builder = blend_metadata_builder(first.attn_backend, groups[0].kv_cache_spec, groups[0].layer_names,
                                               self.vllm_config, self.caches[0].kv.device)
        self.attention = attention_path(self.caches, self.blend_attention)
        ops = DEFAULT_OPS
        if self.caches[0].kv.device.type == "cpu" and self.cpu_ops == "vllm":
            ops = self._vllm_cpu_ops()
        view = VllmModelView(model, self.spec, ops, tp_sum if self.tp_world > 1 else None)
        graphs = False
        if self.cuda_graphs_wanted and self.attention == "kvblend" and self.tp_world == 1 and view.device.type == "cuda":
            graphs = PostCheckGraphs(view, staging=True, scale=first.impl.scale)
        engine = BlendEngine(view, self.store, cuda_graphs=graphs)
        if engine.disabled_reason:
            raise ValueError(engine.disabled_reason)
        log.info("kvblend blend runs on vLLM's %s modules, its %s paged cache and %s attention (rope shift: %s ops; "
                 "post-check CUDA graphs %s)", type(model).__name__, first.attn_backend.get_name(),
                 "kvblend's sparse-query" if self.attention == "kvblend" else "vLLM's", ops.name,
                 "on" if graphs else "off")
        return engine

    def _vllm_cpu_ops(self) -> ModelOps:
        """vLLM's C++ kernels for the chunks' rope shift when they match the torch references here."""
        from kvblend.rope import inv_freq
        from kvblend.vllm.cpu_ops import VLLM_CPU_OPS, check_ops

        try:
            reason = check_ops(VLLM_CPU_OPS, self.spec.torch_dtype, self.head_dim, self.spec.rope.style,
                               freq=inv_freq(self.spec.rope))
        except Exception as exc:  # a vLLM build without these kernels
            reason = f"vLLM's CPU kernels failed to run: {exc!r}"
        if reason:
            log.warning("kvblend rope shift runs on its torch ops: %s", reason)
            return DEFAULT_OPS
        return VLLM_CPU_OPS

    def paged_target(self, block_ids: list[int], write_from: int, num_tokens: int) -> PagedKV:
        """The request's blocks as a blend target; with CUDA graphs its staging pair is theirs (what they read)."""
        graphs = self._engine.graphs if self._engine is not None else None
        return PagedKV(self.caches, self._builder, block_ids, write_from, num_tokens, self.attention,
                       staging=graphs.workspace(num_tokens) if graphs is not None else None)

    # -- before the forward -------------------------------------------------------------------------------
    def start_load(self, meta: KVBlendMetadata) -> None:
        """Prefetch every job's entries whole into the memory tier first (background threads; the layer reads
        wait for them), so loading overlaps the blends' first layers and the jobs before it; then run them. Storage
        loads the controller declines (`_declined`, decided before any prefetch) are left to vLLM."""
        meta = meta.for_shard(self.shard)
        loads = [_SpanLoad(job) for job in meta.loads if not self._declined(job)]
        wanted = [s.key for job in meta.blends if job.prefetch for s in job.exact_spans + job.chunks]
        wanted += [s.key for load in loads if load.job.prefetch for s in load.job.spans]
        if wanted:
            self.store.prefetch(wanted, kv_layout(self.spec))
        for job in meta.blends:
            self._blend(job)
        if self.layerwise_loads:
            self._loads += loads
            return
        for load in loads:  # every layer before the forward, a load at a time: one load's staging alive on a GPU
            self._loads = [load]
            for layer in range(len(self.caches)):
                self._write_layer(layer)

    def _declined(self, job: LoadJob) -> bool:
        """Whether the loading controller has vLLM recompute this storage-mode load instead (its blocks reported
        as not loaded, its decision in the request's report): when reading its spans, each from the fastest tier
        holding it at that tier's measured speed, costs more than vLLM's measured prefill of their tokens."""
        if not self.controller_wanted or not self._may_decline:
            return False
        token_bytes = kv_layout(self.spec).token_layer_bytes * self.spec.num_layers
        tiers = [self.store.fastest_holder(s.key) for s in job.spans]
        tokens = sum(s.end - max(s.start, job.write_from) for s in job.spans)
        decision = decide_storage(tiers, [s.length * token_bytes for s in job.spans],
                                  self.store.meter.seconds_per_byte(), tokens, self.prefill.value())
        self._reports.setdefault(job.req_id, {})["controller"] = decision.as_dict()
        if decision.load_ms is not None:
            self.stats.add("controller_decisions", label="storage_recompute" if decision.recompute else "storage_load")
        if decision.recompute:
            self.failed_blocks |= blocks_from(job.block_ids, job.write_from, self.block_size)
        return decision.recompute

    def _mark(self):
        """Now, on the device's timeline: a recorded CUDA event on a GPU, the host's clock on a CPU."""
        return recorded_event() if self.caches[0].kv.device.type == "cuda" else time.perf_counter()

    def wait_layer(self, layer_name: str, step_tokens: int = 0) -> None:
        """Before a layer's attention in vLLM's forward of `step_tokens` tokens: write that layer's rows of the
        pending layerwise loads (its first layer: start timing a prefill that loads nothing)."""
        if layer_name == self._layer_names[0] and step_tokens >= PREFILL_MIN_TOKENS and not self._loads:
            self._step = (step_tokens, self._mark())
        if self.layerwise_loads and self._loads:
            self._write_layer(layer_index(layer_name))

    def layer_saved(self, layer_name: str) -> None:
        """After a layer's attention in vLLM's forward: its last layer ends a timed prefill, scaled from the first
        attention to the last (all but one layer's projections and MLP) up to every layer."""
        if self._step is None or layer_name != self._layer_names[-1]:
            return
        (tokens, start), end, n = self._step, self._mark(), len(self._layer_names)
        self._step = None
        share = n / (n - 1) if n > 1 else 1.0
        if isinstance(start, float):
            self.prefill.observe((end - start) * share, tokens)
        else:
            self.prefill.observe_events(start, end, round(tokens / share))

    def _write_layer(self, layer: int) -> None:
        """Write this layer's rows of every pending span load, straight from its spans' entries (read whole, for
        all of a load's spans at once, at the first layer: the prefetch started above has had until then)."""
        for load in self._loads:
            if load.entries is None and not load.failed:
                self._read_entries(load)
            if load.failed:
                continue
            job, cache = load.job, self.caches[layer]
            if cache.kind == "packed":  # a GPU: a few layers of every span per copy, one scatter per layer
                if load.source is None:
                    self._stage(load, cache.kv.device)
                k, v = load.source.wait(layer)
                rows = load.source.rows(layer, load.kept)
                cache.write(k[rows], v[rows], load.slots)
                continue
            for first, end, entry, keep in load.rows:
                cache.write_rows(entry.k[layer, keep], entry.v[layer, keep], job.block_ids, first, end)
        if layer == len(self.caches) - 1:
            for load in self._loads:
                if load.source is not None:
                    load.source.close()
            self._loads = []

    def _stage(self, load: _SpanLoad, device: torch.device) -> None:
        """The load's entries as one layer source (from pinned memory: `group` layers of each entry per copy on a
        side stream, ahead of the layers' scatters; 64 spans of a 16k-token prompt took 4096 copies one layer and
        span at a time), the rows of their concatenation it writes, and those rows' slots."""
        kept, offset = [], 0
        for _, _, entry, keep in load.rows:
            kept.append(torch.arange(offset + keep.start, offset + keep.stop))
            offset += entry.k.shape[1]
        load.kept = torch.cat(kept).to(device)
        load.slots = torch.cat([slots_for(load.job.block_ids, first, end, self.block_size)
                                for first, end, _, _ in load.rows]).to(device)
        load.source = TensorLayerSource([e.k for _, _, e, _ in load.rows], [e.v for _, _, e, _ in load.rows], device)

    def _read_entries(self, load: _SpanLoad) -> None:
        """Every span's entry in one batched store read; a span no tier holds intact fails the load (vLLM
        recomputes its rows from `write_from`)."""
        job = load.job
        entries = self.store.get_many([s.key for s in job.spans], kv_layout(self.spec))
        missing = [s for s, entry in zip(job.spans, entries) if entry is None]
        if missing:
            error = ChunkLoadError(missing[0].key, 0)
            log.warning("request %s: %s (%d of %d spans); vLLM will recompute it", job.req_id, error, len(missing),
                        len(job.spans))
            load.failed = True
            self.stats.add("failures", label="load")
            self.failed_blocks |= blocks_from(job.block_ids, job.write_from, self.block_size)
            self._reports[job.req_id] = {"load_error": str(error)}
            return
        load.entries = entries

    def _blend(self, job: BlendJob) -> None:
        device = self.caches[0].kv.device
        profiled = job.profile and device.type == "cuda"
        if profiled:  # the blend's time then leaves out the device work queued before it
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        hits_before = self.store.hits()
        try:
            report = self._run_blend(job)
            report["hits"] = {name: n - hits_before[name] for name, n in self.store.hits().items()}
        except Exception as exc:  # any failure: vLLM recomputes the request's claimed rows
            log.warning("request %s: blend failed (%s: %s); vLLM will recompute it", job.req_id, type(exc).__name__, exc)
            self.failed_blocks |= blocks_from(job.block_ids, job.num_computed, self.block_size)
            report = {"blend_error": f"{type(exc).__name__}: {exc}"}
        if profiled:
            torch.cuda.synchronize(device)
            report["profiled"] = True
        report["blend_ms"] = (time.perf_counter() - start) * 1e3
        blend_report(self.stats, report)
        self._reports[job.req_id] = report

    def _agreed(self, prepare: Callable[[], T]) -> T:
        """`prepare()` (a blend's reads); under TP it fails on every rank if it failed on any, before the blend's
        collectives (a rank that failed alone would leave the others waiting in them)."""
        try:
            value, error = prepare(), None
        except Exception as exc:
            value, error = None, exc
        if self.tp_world > 1:
            failed = tp_sum(torch.tensor([float(error is not None)], device=self.caches[0].kv.device))
            if error is None and failed.item() > 0:
                raise RuntimeError(f"{int(failed.item())} other tensor-parallel rank(s) could not load this "
                                   "request's KV")
        if error is not None:
            raise error
        return value

    def _run_blend(self, job: BlendJob) -> dict:
        end = len(job.prompt) - 1
        segments, pos = [], 0
        for span in job.chunks:
            segments += [job.prompt[pos : span.start], ChunkRef(tuple(job.prompt[span.start : span.end]), span.key)]
            pos = span.end
        segments.append(job.prompt[pos:end])
        layout = PromptLayout.from_segments(segments)
        exact = max([job.num_computed] + [s.end for s in job.exact_spans])
        prefix_kv, chunk_kv = self._agreed(lambda: self._blend_inputs(job, exact))
        target = self.paged_target(job.block_ids, job.num_computed, end)
        config, decision = job.config, None
        if self.controller is not None:
            chunk_tokens = sum(s.length for s in job.chunks)
            decision = self.controller.plan([s.key for s in job.chunks], chunk_tokens,
                                            max(end - exact - chunk_tokens, 0), job.config)
            config = decision.apply(job.config)
        timed = self.controller is not None and target.device.type == "cuda"
        if timed:  # host stage times are launch times on a GPU: the controller gets the blend's device time
            start_event = recorded_event()
        copies = {}  # with profile on a GPU: the chunk KV's copies to the device (TensorLayerSource.copy_times)
        if chunk_kv is None:
            result = self._engine.blend(layout, config, logits_at="none", on_missing="recompute", exact_prefix=exact,
                                        prefix_kv=prefix_kv, target=target,
                                        tier=decision.tier if decision and not decision.recompute else None,
                                        profile=job.profile)
        else:  # every entry is in memory (under TP on every rank: no read can fail one rank mid-run)
            plan = self._engine.plan(layout, config, logits_at="none", exact_prefix=exact,
                                     bases={key: kv.base_position for key, kv in chunk_kv.items()})
            ks, vs = [chunk_kv[k].k for k in plan.cached_keys], [chunk_kv[k].v for k in plan.cached_keys]
            source = TensorLayerSource(ks, vs, self.caches[0].kv.device, timed=job.profile) if ks else None
            result = self._engine.run(plan, source, prefix_kv=prefix_kv, target=target, profile=job.profile)
            copies = source.copy_times() if job.profile and source is not None else {}
        stats = result.stats
        if timed:
            self.controller.observe_events(start_event, recorded_event(), stats.token_layers_computed)
        elif self.controller is not None:
            self.controller.observe(stats.stage_ms, stats.token_layers_computed)
        controller = {"controller": decision.as_dict()} if decision else {}
        gate = {"gate": stats.gate} if stats.gate is not None else {}
        return {**controller, **gate, "tokens_reused": stats.tokens_reused, "tokens_recomputed": stats.tokens_recomputed,
                "rows_computed": stats.rows_last_layer, "compute_fraction": round(stats.compute_fraction, 4),
                "recompute_ratio": stats.recompute_ratio, "exact_prefix": exact, "ops": self._engine.model.ops.name,
                **({"cuda_graphs": stats.graphs} if stats.graphs else {}),
                "stage_ms": {k: round(v, 2) for k, v in stats.stage_ms.items()}, **({"h2d": copies} if copies else {})}

    def _blend_inputs(self, job: BlendJob, exact: int) -> tuple[tuple | None, dict[ChunkKey, ChunkKV] | None]:
        """The exact prefix's KV, and every chunk's entry whole: under TP (every rank must hold them all before
        the blend's collectives) and on a GPU, where whole entries move in a few large asynchronous copies from
        pinned memory (`TensorLayerSource`) instead of a host concatenation per layer. None on one rank where a
        tier lacks a chunk, or on a CPU: the blend reads layer by layer from the store, recomputing what is
        missing."""
        if self._engine is None:
            raise RuntimeError(self._verdict[1] if self._verdict else "the blend engine is not available")
        prefix_kv = self._exact_prefix(job, exact) if exact else None
        if self.tp_world == 1 and self.caches[0].kv.device.type != "cuda":
            return prefix_kv, None
        keys = list(dict.fromkeys(s.key for s in job.chunks))
        entries = self.store.get_many(keys, kv_layout(self.spec))
        missing = [key for key, entry in zip(keys, entries) if entry is None]
        if missing and self.tp_world == 1:
            return prefix_kv, None
        if missing:
            raise ChunkLoadError(missing[0], 0)
        return prefix_kv, dict(zip(keys, entries))

    def _exact_prefix(self, job: BlendJob, exact: int) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of rows [0, exact): vLLM's own cache hit from its blocks, then exact stored spans."""
        k_parts, v_parts = [], []
        if job.num_computed:  # copied on the device: no round trip through the host
            k, v = self._copy_rows(job.block_ids, 0, job.num_computed)
            k_parts.append(k)
            v_parts.append(v)
        for span in job.exact_spans:
            entry = self.store.get(span.key, expect=kv_layout(self.spec))
            if entry is None:
                raise ChunkLoadError(span.key, 0)
            keep = slice(max(job.num_computed - span.start, 0), span.length)
            k_parts.append(entry.k[:, keep].to(self.caches[0].kv.device))
            v_parts.append(entry.v[:, keep].to(self.caches[0].kv.device))
        k, v = torch.cat(k_parts, dim=1), torch.cat(v_parts, dim=1)
        if k.shape[1] != exact:
            raise ValueError(f"exact prefix holds {k.shape[1]} rows, expected {exact}")
        return k, v

    # -- after the forward --------------------------------------------------------------------------------
    def after_step(self, meta: KVBlendMetadata) -> None:
        meta = meta.for_shard(self.shard)
        if meta.check is not None and self._verdict is None:
            self._verdict = self._self_check(meta.check)
        if self.tp_world > 1 and meta.loads:
            self._agree_on_loads(meta.loads)
        for job in meta.saves:
            report = self._reports.get(job.req_id, {})
            if "load_error" in report or (report.get("controller") or {}).get("recompute"):
                continue  # rows computed this step on top of a failed or declined load are recomputed, never stored
            try:
                self._save(job)
            except Exception as exc:  # extraction is best effort: the request itself is already served
                log.warning("request %s: could not store its KV (%s: %s)", job.req_id, type(exc).__name__, exc)

    def _agree_on_loads(self, loads: list[LoadJob]) -> None:
        """A span load that failed on any rank failed for every rank: vLLM recomputes its blocks on all ranks (it
        joins the ranks' failed blocks), and no rank stores the rows this step computed on top of it (their hidden
        states mixed in the failed rank's heads)."""
        failed = torch.tensor([float("load_error" in self._reports.get(job.req_id, {})) for job in loads],
                              device=self.caches[0].kv.device)
        for job, anywhere in zip(loads, tp_sum(failed).tolist()):
            if anywhere and "load_error" not in self._reports.get(job.req_id, {}):
                self._reports[job.req_id] = {"load_error": "a span failed to load on another tensor-parallel rank"}

    def _copy_rows(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [layers, end - start, kv_heads, head_dim] of a request's positions [start, end), copied out of the
        paged blocks on the cache's device."""
        shape = (len(self.caches), end - start, self.num_kv_heads, self.head_dim)
        k = torch.empty(shape, dtype=self.caches[0].kv.dtype, device=self.caches[0].kv.device)
        v = torch.empty_like(k)
        if self.caches[0].kind == "packed":  # a GPU: the rows' slots move to the device once, not once a layer
            slots = slots_for(block_ids, start, end, self.block_size).to(k.device)
            for layer, cache in enumerate(self.caches):
                got_k, got_v = cache.read(slots)
                k[layer].copy_(got_k)
                v[layer].copy_(got_v)
            return k, v
        for layer, cache in enumerate(self.caches):
            cache.read_rows_into(k[layer], v[layer], block_ids, start, end)
        return k, v

    def _read_rows(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `_copy_rows`, on the host."""
        k, v = self._copy_rows(block_ids, start, end)
        return k.cpu(), v.cpu()

    def _save(self, job: SaveJob) -> None:
        """Copy the spans' KV out of the paged cache (the staging copy) and hand it to the store, whose slow
        tiers are written by its background thread; on a GPU the host copy and the put run in SaveQueue's thread."""
        start = time.perf_counter()
        if self._saver is not None:  # one gather per layer for a run of adjacent spans, not one per span
            for group in save_groups(job.spans, kv_layout(self.spec).token_layer_bytes * self.spec.num_layers):
                first = group[0].start
                k, v = self._copy_rows(job.block_ids, first, group[-1].end)
                for span in group:
                    rows = slice(span.start - first, span.end - first)
                    self._saver.submit(span.key, k[:, rows], v[:, rows], job.prompt[span.start : span.end], span.start)
        else:
            for span in job.spans:
                self._put(span.key, *self._read_rows(job.block_ids, span.start, span.end),
                          job.prompt[span.start : span.end], span.start)
        held = (time.perf_counter() - start) * 1e3  # the first token waits for the step: said in the report
        self._reports.setdefault(job.req_id, {}).update(stored_spans=len(job.spans), store_ms=round(held, 2))

    def _put(self, key: ChunkKey, k: torch.Tensor, v: torch.Tensor, ids: list[int], base_position: int) -> None:
        """One span's host K/V into the store, noted for the scheduler (worker_meta's `stored`)."""
        self.store.put(key, ChunkKV(key, k, v, torch.tensor(ids), base_position=base_position))
        with self._stored_lock:
            self._stored.append((key, ids if key.is_alone else None))

    def close(self) -> None:
        """Store what is still queued (the connector's shutdown, before the store closes)."""
        if self._saver is not None:
            self._saver.close()
            self._saver = None

    def _self_check(self, job: SaveJob) -> tuple[bool, str]:
        """Blend vLLM's own first prefilled prompt on its own blocks and compare with the KV vLLM computed."""
        if self._engine is None:
            return False, "the blend engine is not available"
        try:
            passed, reason, report = self_check(self, job)
        except Exception as exc:
            return False, f"self-check could not run: {type(exc).__name__}: {exc}"
        self.check_report = report if self.shard == WHOLE else {"shard": self.shard, **report}
        (log.info if passed else log.warning)("kvblend self-check %s: %s", "passed" if passed else "failed, blending off",
                                              report)
        return passed, reason

    def worker_meta(self) -> KVBlendWorkerMeta | None:
        with self._stored_lock:
            stored, self._stored = self._stored, []
        if self._verdict is None and not self._reports and not stored:
            return None
        meta = KVBlendWorkerMeta(reports=self._reports, stored=stored)
        if self._verdict is not None:
            meta.blend_ready, meta.reason = self._verdict
            meta.check_report = self.check_report
        self._reports = {}
        return meta

    def take_stats(self) -> KVBlendStats | None:
        """What the blends and the store's tiers counted since the last call (None: nothing)."""
        now = self.store.counters()
        tier_deltas(self.stats, now, self._counted)
        self._counted = now
        return take(self.stats)

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed
