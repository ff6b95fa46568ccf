"""The CacheBlend engine: cached chunk KV + rope_shift + selective recompute -> the KV of the whole prompt.

Plan once per request (rows, positions, deltas, the initial active set), then run layer by layer. At each layer
the *active* rows (prefix, suffix, chunk tokens still selected) get fresh Q/K/V from their hidden states and
attend over all keys, whose other rows hold the cached chunk KV re-rotated to the new positions. A row can only
leave the active set (at a check layer), since a row whose hidden state was dropped cannot be resumed.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

from kvblend.blend.check_graphs import CheckLayerGraphs
from kvblend.blend.config import BlendConfig
from kvblend.blend.controller import recorded_event
from kvblend.blend.cuda_graphs import PostCheckGraphs, bucket
from kvblend.blend.gate import (
    GateReport,
    decide,
    fall_back,
    gate_signals,
    kv_mismatch,
    mean_deviation,
    relative_deviation,
    reuse_error,
)
from kvblend.blend.kv_target import DenseKV, KVTarget
from kvblend.blend.layout import ChunkRef, LayoutError, PromptLayout
from kvblend.blend.rope_check import check_rope_shift
from kvblend.blend.select import (
    attention_received,
    deviation_parts,
    mask_indices,
    random_scores,
    scores_from_parts,
    select_count,
    select_tokens,
)
from kvblend.blend.source import ChunkLoadError, LayerSource, StoreLayerSource, kv_layout
from kvblend.model.runner import LlamaModel
from kvblend.store.key import ChunkKey
from kvblend.triton_kernels.checks import check_index_ranges

log = logging.getLogger(__name__)


@dataclass
class BlendStats:
    """What one request reused and recomputed, and where its time went."""

    policy: str
    tokens_total: int
    tokens_chunks: int
    tokens_reused: int
    tokens_recomputed: int
    token_layers_computed: int = 0
    token_layers_full: int = 0
    rows_last_layer: int = 0
    gate: dict | None = None
    graphs: str | None = None  # the post-check CUDA graphs: "captured" (after running eagerly), "replayed", or why not
    stage_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def recompute_ratio(self) -> float:
        """Chunk tokens recomputed in the last layer over all chunk tokens."""
        return self.tokens_recomputed / self.tokens_chunks if self.tokens_chunks else 1.0

    @property
    def compute_fraction(self) -> float:
        """Token-layers computed relative to a full prefill of the same prompt."""
        return self.token_layers_computed / self.token_layers_full if self.token_layers_full else 1.0


@dataclass
class BlendPlan:
    layout: PromptLayout
    config: BlendConfig
    ids: torch.Tensor
    positions: torch.Tensor
    cached_keys: list[ChunkKey]
    cached_src: torch.Tensor
    cached_rows: torch.Tensor
    cached_delta: torch.Tensor
    fixed_rows: torch.Tensor
    initial_rows: torch.Tensor
    logits_rows: torch.Tensor
    head_rows: torch.Tensor
    exact_prefix: int
    recomputed_chunks: list[int]
    recomputed_tokens: int
    cached_lengths: tuple[int, ...] = ()  # the reused rows of each chunk in cached_keys, in prompt order


@dataclass
class BlendResult:
    """Per-layer K/V of the whole prompt (None when the KV went straight to a paged cache), logits, report."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    logits: torch.Tensor
    stats: BlendStats
    plan: BlendPlan


def aligned_to_device(parts: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """1-D int64 host tensors moved in one asynchronous copy (a blocking copy waits for the device; pinning a fresh
    host tensor costs milliseconds), each a view starting on a 16-byte boundary: Triton specializes a kernel on
    its pointers' 16-byte alignment, so an odd offset would compile another variant (inside a CUDA-graph capture,
    when the capture's static copies are aligned and the eager run's views were not)."""
    sizes = [t.numel() for t in parts]
    starts = [0, *itertools.accumulate(bucket(n, 2) for n in sizes)]  # two int64 per 16 bytes
    host = torch.zeros(starts[-1], dtype=torch.int64)
    for t, start in zip(parts, starts):
        host[start : start + t.numel()] = t
    on_device = host.to(device, non_blocking=True)  # pageable: staged by the driver before this returns
    return [on_device[start : start + n] for start, n in zip(starts, sizes)]


class BlendRun:
    """Per-request state of one blend: the active rows, their hidden states, the output KV. Step per layer."""

    def __init__(self, engine: "BlendEngine", plan: BlendPlan, source: LayerSource | None,
                 prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None, target: KVTarget | None = None,
                 question_attention: torch.Tensor | None = None) -> None:
        model, spec = engine.model, engine.model.spec
        self.model, self.plan, self.source = model, plan, source
        self.prefix_kv = prefix_kv
        self.profile = False  # True (`start_profile`): stage times are device times, from CUDA events
        self._marks: list[tuple[str, torch.cuda.Event]] = []  # (stage, event at its end) in stream order
        device = model.device
        T = plan.ids.shape[0]
        graphs, unused = engine.graphs, None  # unused: why an engine's graphs do not serve this run (its report)
        if graphs is not None and not graphs.applies(plan):
            unused = f"off: {graphs.failure}" if graphs.failure else "not used: every row is recomputed"
            graphs = None
        if target is None:  # dense KV: in the graphs' workspace unless they keep one staging layer for a paged target
            graphs = graphs if graphs is not None and not graphs.staging else None
            target = DenseKV(spec, T, model.dtype, device, graphs.workspace(T) if graphs else None)
        elif graphs is not None and not graphs.holds(target):  # the graphs read only their own workspace
            unused, graphs = "not used: the target's KV buffers are not the graphs' workspace", None
        self.graphs = graphs
        self.target = target
        self.target.rows_changed()
        # Every index vector the run reads on the device, in one copy; host masks give the counts.
        is_cached = torch.zeros(T, dtype=torch.int64)
        is_cached[plan.cached_rows] = 1
        is_head = torch.zeros(T, dtype=torch.int64)
        is_head[plan.head_rows] = 1
        parts = (plan.initial_rows, plan.positions, plan.ids, plan.cached_src, plan.cached_rows, plan.cached_delta,
                 is_cached, is_head)
        (self.rows, self.positions, ids, self._cached_src, self._cached_dst, self._delta, is_cached_dev,
         is_head_dev) = aligned_to_device(parts, device)
        self.h = model.embed(ids[self.rows])
        self.is_cached, self.is_head = is_cached_dev.bool(), is_head_dev.bool()
        self.checks = dict(zip(plan.config.check_layers, plan.config.ratios())) if plan.config.selects else {}
        n_chunks = plan.cached_rows.numel()
        self.stats = BlendStats(
            policy=plan.config.policy,
            tokens_total=T,
            tokens_chunks=sum(len(c.token_ids) for c in plan.layout.chunks),
            tokens_reused=0,
            tokens_recomputed=0,
            token_layers_full=(T - plan.exact_prefix) * spec.num_layers,
            graphs=unused,
        )
        self._n_cached = n_chunks
        # Chunk rows among the active rows, and question rows: host counts that give every selection a static
        # shape, so the check layers need no device sync.
        self._n_chunk_active = int(is_cached[plan.initial_rows].sum())
        self._n_suffix = T - max(plan.layout.suffix_start, plan.exact_prefix)
        self._n_heads = plan.head_rows.numel()
        self._rot: tuple[torch.Tensor, torch.Tensor] | None = None
        config = plan.config
        gated = config.policy == "cacheblend" and config.gated and n_chunks > 0
        self.gate = GateReport(config.gate_bound, config.gate_raise, ratio=config.ratio) if gated else None
        # The gate's probes (kvblend.blend.gate): the fallback at layer 0, while every chunk row is active; the
        # raise (and the calibration's signals) at the first check layer, which needs question rows.
        self._probe = 0 if gated and config.gate_bound is not None else None
        self._raise_at = min(self.checks) if gated and self.checks and self._n_suffix > 0 and (
            config.gate_raise is not None or config.gate_calibration) else None
        self.collect: list[torch.Tensor] | None = None  # the question pass: the question's attention per layer
        self.question_attention = question_attention
        # The plan's row ranges, checked on the host copies (no device sync): the source's row count per layer
        # is then all that remains to check, and rope_shift_gather skips its own (syncing) range check.
        check_index_ranges((plan.cached_rows, 0, T, "cached rows"), (plan.cached_src, 0, 1 << 62, "cached src"))
        self._src_rows = int(plan.cached_src.max()) + 1 if n_chunks else 0
        if source is not None:
            source.start(0 if self._n_chunk_active < n_chunks or not self.checks or self._probe is not None
                         else min(self.checks))

    @property
    def k(self) -> torch.Tensor | None:
        """The whole prompt's K [layers, tokens, kv_heads, head_dim] when the target keeps it (the dense path)."""
        return self.target.k

    @property
    def v(self) -> torch.Tensor | None:
        return self.target.v

    def graphs_from(self) -> int:
        """The first layer replayed as a CUDA graph: the one after the last check layer (the number of layers
        when this run uses no graphs)."""
        if self.graphs is None:
            return self.model.spec.num_layers
        return max(self.checks) + 1 if self.checks else 0

    def start_profile(self) -> None:
        """Time each stage on the device from here on: a CUDA event at each stage's end, read at `finish`. No
        sync: copies and compute overlap as in an unprofiled run, and a stage's time includes the device's waits
        for its inputs (`fetch_wait`: for the layer's chunk KV) and for the host's launches."""
        self.profile = True
        self._marks = [("", recorded_event())]

    def _tick(self, stage: str, start: float) -> float:
        """End `stage` (begun at host time `start`): its host time, or with `profile` an event on the device."""
        now = time.perf_counter()
        if self.profile:
            self._marks.append((stage, recorded_event()))
        else:
            self.stats.stage_ms[stage] += (now - start) * 1e3
        return now

    def _device_stages(self) -> None:
        """The profiled stages' device times: between each stage's end event and the one before it."""
        self._marks[-1][1].synchronize()
        for (_, before), (stage, after) in itertools.pairwise(self._marks):
            self.stats.stage_ms[stage] += before.elapsed_time(after)

    def fill_cached(self, layer: int) -> None:
        """Layer `layer`'s reused KV rows: cached chunk KV re-rotated to its new positions, the exact prefix.
        Skipped while every chunk row is still recomputed and not compared (its KV would be overwritten)."""
        model, plan = self.model, self.plan
        t = time.perf_counter()
        K, V = self.target.layer(layer)
        if self._n_cached and (self._n_chunk_active < self._n_cached or layer in self.checks or layer == self._probe):
            ck, cv = self.source.wait(layer)
            if layer + 1 < model.spec.num_layers:
                self.source.start(layer + 1)
            t = self._tick("fetch_wait", t)
            if ck.shape[0] < self._src_rows:
                raise ValueError(f"layer source gave {ck.shape[0]} cached rows, the plan reads {self._src_rows}")
            model.ops.rope_shift_gather(ck, cv, self.source.rows(layer, self._cached_src), K, V, self._cached_dst,
                                        self._delta, model.freq, model.spec.rope.style, check=False)
            self._tick("rope_shift_gather", t)
        if self.prefix_kv is not None:
            K[: plan.exact_prefix] = self.prefix_kv[0][layer]
            V[: plan.exact_prefix] = self.prefix_kv[1][layer]

    def step(self, layer: int) -> None:
        """Compute layer `layer`: fill its KV rows (cached, shifted) and advance the active rows' hidden states."""
        self.fill_cached(layer)
        self.compute(layer)

    def compute(self, layer: int) -> None:
        """Layer `layer` once its cached KV rows are filled: fresh Q/K/V of the active rows, the selection at a
        check layer, attention and MLP. Device work of host-known shapes only (what a CUDA graph captures)."""
        model = self.model
        t = time.perf_counter()
        K, V = self.target.layer(layer)
        rows = self.rows
        if self._rot is None:
            self._rot = model.rotary(self.positions[rows])
        q, k, v = model.qkv(layer, self.h, self.positions[rows], self._rot)
        t = self._tick("qkv", t)
        if layer == self._probe:  # before the fresh KV overwrites the reused
            self._fallback(rows, k, v, K, V)
            t = self._tick("gate", t)
        check = layer in self.checks
        if check:  # deviation from the reused KV, read before the fresh KV overwrites it
            chunk_sel = mask_indices(self.is_cached[rows], self._n_chunk_active)
            parts = self._deviation(layer, rows, chunk_sel, k, v, K, V)
            gating = layer == self._raise_at
            if gating:  # the reused K/V of the chunk rows (indexing copies them)
                old = (K[rows[chunk_sel]], V[rows[chunk_sel]])
                deviation = relative_deviation(k[chunk_sel], v[chunk_sel], *old, self.model.heads_sum)
        K[rows], V[rows] = k, v
        if self.collect is not None:
            suffix = slice(rows.numel() - self._n_suffix, rows.numel())
            self.collect.append(attention_received(q[suffix], self.positions[rows[suffix]], K, self.positions))
        if check:
            scores = self._scores(rows, chunk_sel, q, parts, K)
            if gating:
                t = self._tick("select", t)
                self._gate(layer, rows, chunk_sel, q, scores, K, V, old, deviation)
                t = self._tick("gate", t)
            keep = self._select(layer, rows, chunk_sel, scores)
            t = self._tick("select", t)
            rows, q, self.h = rows[keep], q[keep], self.h[keep]
            self._rot = None
            self.target.rows_changed()
        self.target.commit(layer)
        self.rows = rows
        self.stats.token_layers_computed += rows.numel()
        h = self.h
        last = layer == model.spec.num_layers - 1
        if last:  # past the last layer only the logits rows (the last ones) matter
            n = self.plan.logits_rows.numel()
            rows, q, h = rows[rows.numel() - n :], q[q.shape[0] - n :], h[h.shape[0] - n :]
            if n == 0:
                self.h = h
                return
        attn = self.target.attend(layer, q, rows, self.positions, last)
        t = self._tick("attention", t)
        self.h = model.finish_layer(layer, h, attn.reshape(attn.shape[0], -1))
        self._tick("mlp", t)

    def _deviation(self, layer: int, rows, chunk_sel, k, v, K, V) -> torch.Tensor:
        """Per active chunk row (`chunk_sel` indexes `rows`), how far its fresh K/V deviate from the reused: the
        deviation's parts over this model's heads (`deviation_parts`), or the random policy's scores."""
        config = self.plan.config
        if config.policy == "random":
            return random_scores(self._n_chunk_active, config.seed, layer, k.device)
        chunk_rows = rows[chunk_sel]
        return deviation_parts(k[chunk_sel], v[chunk_sel], K[chunk_rows], V[chunk_rows], config.deviation)

    def _scores(self, layer_rows, chunk_sel, q, parts, K) -> torch.Tensor:
        """The selection's scores: the deviation from its parts, weighted by the question's attention
        (config.attention_weighted) read where config.weighting says. Under tensor parallelism the parts and the
        attention (each over this rank's heads) are summed over the ranks in one all-reduce (`heads_sum`), so
        every rank scores, and selects, alike."""
        config = self.plan.config
        if config.policy == "random":
            return parts
        chunk_rows = layer_rows[chunk_sel]
        n_parts = parts.shape[0]
        at_check = config.attention_weighted and config.weighting in ("check", "both")
        if at_check:  # the mean over this rank's heads: the rank count cancels in the normalisation below
            suffix = slice(layer_rows.numel() - self._n_suffix, layer_rows.numel())
            received = attention_received(q[suffix], self.positions[layer_rows[suffix]], K, self.positions)[chunk_rows]
            parts = torch.cat([parts, received[None]])
        parts = self.model.heads_sum(parts)
        scores = scores_from_parts(parts[:n_parts], config.deviation)
        if config.attention_weighted:
            received = None
            if at_check:
                received = parts[n_parts] / parts[n_parts].mean().clamp_min(1e-30)
            if config.weighting in ("question_pass", "both"):
                ahead = self.question_attention[chunk_rows]
                received = ahead if received is None else received * ahead
            scores = scores * received
        return scores

    def _select(self, layer: int, rows, chunk_sel, scores) -> torch.Tensor:
        """Ascending indices into `rows` of those kept after this check layer: every non-chunk row plus the
        chosen chunk rows. Every shape is known on the host (counts, the question rows last), so no device sync."""
        chunk_rows = rows[chunk_sel]
        count = self._keep_count(self.checks[layer])
        picked = select_tokens(scores, count, self._forced(chunk_rows))
        chosen = chunk_sel[picked]
        keep = (~self.is_cached[rows]).index_fill_(0, chosen, True)  # a scalar fill: no host-to-device copy
        kept = mask_indices(keep, rows.numel() - self._n_chunk_active + count)
        self._n_chunk_active = count
        return kept

    def _keep_count(self, ratio: float) -> int:
        """How many chunk rows a check layer at `ratio` keeps (never more than are still active)."""
        return min(select_count(ratio, self._n_cached), self._n_chunk_active)

    def _forced(self, chunk_rows: torch.Tensor) -> torch.Tensor | None:
        """Which of `chunk_rows` are chunk heads the selection always keeps (None when there are none)."""
        return self.is_head[chunk_rows] if self._n_heads else None

    def _fallback(self, rows, k, v, K, V) -> None:
        """The gate's fallback probe at layer 0 (every chunk row active): above the bound the request is a full
        prefill, every row staying active with no check and no reused KV read after. One host read."""
        chunk_sel = mask_indices(self.is_cached[rows], self._n_chunk_active)
        chunk_rows = rows[chunk_sel]
        deviation = relative_deviation(k[chunk_sel], v[chunk_sel], K[chunk_rows], V[chunk_rows], self.model.heads_sum)
        if fall_back(self.gate, kv_mismatch(deviation, self.plan.cached_lengths)):
            self.checks, self._raise_at = {}, None

    def _gate(self, layer: int, rows, chunk_sel, q, scores, K, V, old, deviation) -> None:
        """The gate's raise probe at the first check layer: its signal (with `gate_calibration` every signal, for
        the configured ratio's selection), then the request's ratio; a raised ratio replaces this run's schedule
        before any row is dropped, a full prefill keeps every row and ends the checks. One host read."""
        config = self.plan.config
        if config.gate_calibration:
            suffix = slice(rows.numel() - self._n_suffix, rows.numel())
            chunk_rows = rows[chunk_sel]
            q_pos = self.positions[rows[suffix]]
            received = attention_received(q[suffix], q_pos, K, self.positions)[chunk_rows]
            forced = self._forced(chunk_rows)
            count, wider = self._keep_count(self.checks[layer]), self._keep_count(min(1.0, 2 * self.checks[layer]))
            self.gate.signals.update(gate_signals(received, deviation, scores, select_tokens(scores, count, forced),
                                                  select_tokens(scores, wider, forced)))
            self.gate.signals["reuse_error"] = reuse_error(q[suffix], q_pos, K, V, chunk_rows, *old, self.positions)
        else:
            self.gate.signals.update(mean_deviation(deviation))
        ratio = decide(self.gate, config.ratio)
        if ratio >= 1.0:  # every row stays active: no later check reads reused KV
            self.checks = {layer: 1.0}
        elif ratio != config.ratio:
            raised = replace(config, ratio=ratio, schedule=None)
            self.checks = dict(zip(raised.check_layers, raised.ratios()))

    def finish(self) -> BlendResult:
        """Logits at the plan's logits rows (the hidden states the last layer kept) and the final report."""
        logits = self.model.logits(self.h)
        recomputed = self._n_chunk_active
        self.stats.tokens_recomputed = recomputed + self.plan.recomputed_tokens
        self.stats.tokens_reused = self._n_cached - recomputed
        self.stats.rows_last_layer = self.rows.numel()
        self.stats.gate = self.gate.as_dict() if self.gate is not None else None
        if self.source is not None:
            self.source.close()
        if self.profile:
            self._device_stages()
        return BlendResult(self.target.k, self.target.v, logits, self.stats, self.plan)


class BlendEngine:
    """Blends cached chunk KV for a model. Refuses to blend (plans full prefill) if the rope self-check fails.

    `model` is kvblend's torch runner or anything with its per-layer steps and attributes (embed, rotary, qkv,
    finish_layer, logits; spec, ops, freq, device, dtype), e.g. vLLM's own modules (`VllmModelView`)."""

    def __init__(self, model: LlamaModel, store=None, cuda_graphs: bool | PostCheckGraphs = False) -> None:
        """`cuda_graphs` True: replay the layers after the last check layer as CUDA graphs (the torch runner on
        CUDA), and those up to it once a prompt shape repeats; a run's K/V are then views of the engine's
        workspace, valid until its next run. A PostCheckGraphs: the post-check layers only, with those graphs (a
        paged target's, `staging`: the check layers' commit writes the request's own slots, which a graph would
        keep)."""
        self.model = model
        self.store = store
        self.graphs = cuda_graphs if isinstance(cuda_graphs, PostCheckGraphs) else (
            PostCheckGraphs(model) if cuda_graphs else None)
        self.check_graphs = CheckLayerGraphs(self.graphs) if cuda_graphs is True else None
        self.disabled_reason = check_rope_shift(model.spec)
        if self.disabled_reason:
            log.warning("blending disabled for this model, requests run as full prefill: %s", self.disabled_reason)

    def plan(
        self,
        layout: PromptLayout,
        config: BlendConfig,
        logits_at: str = "last",
        exact_prefix: int = 0,
        recompute_keys: Sequence[ChunkKey] = (),
        on_missing: str = "error",
        bases: Mapping[ChunkKey, int] | None = None,
    ) -> BlendPlan:
        """Rows, positions and the initial selection for one request.

        `exact_prefix`: the first n prompt tokens have exact KV supplied by the caller (a true prefix cache hit).
        `recompute_keys`: chunks to compute instead of reuse (e.g. their entry failed to load).
        `on_missing`: "error" raises on a chunk the store lacks; "recompute" computes it and logs why.
        `bases`: each chunk's KV base position, when the caller supplies the KV through its own LayerSource.
        """
        spec = self.model.spec
        T = layout.num_tokens
        if T > spec.max_position:
            raise LayoutError(f"prompt of {T} tokens exceeds the model's max length of {spec.max_position}")
        if not 0 <= exact_prefix < T:
            raise LayoutError(f"exact_prefix {exact_prefix} must leave at least one of the {T} tokens to compute")
        if config.selects and config.check_layers[-1] >= spec.num_layers:
            raise ValueError(f"check layer {config.check_layers[-1]} beyond the model's {spec.num_layers} layers")
        if on_missing not in ("error", "recompute"):
            raise ValueError(f"on_missing must be 'error' or 'recompute', got {on_missing!r}")
        if logits_at not in ("last", "suffix", "none"):
            raise ValueError(f"logits_at must be 'last', 'suffix' or 'none', got {logits_at!r}")
        if logits_at != "none" and not layout.suffix:
            raise LayoutError("logits need the prompt to end with plain tokens (a question), not a chunk")
        full = config.policy == "full_prefill" or self.disabled_reason is not None
        fixed, recomputed, heads, picks = [], [], [], []
        cached_keys, cached_src, cached_dst, cached_delta = [], [], [], []
        src_offset, pos, chunk_index, recomputed_tokens = 0, 0, -1, 0
        for segment in layout.segments:
            n = layout._len(segment)
            live = torch.arange(min(max(pos, exact_prefix), pos + n), pos + n)
            if not isinstance(segment, ChunkRef):
                fixed.append(live)
            elif live.numel():
                chunk_index += 1
                if full:
                    base = None
                elif bases is not None:
                    base = bases[segment.key]
                else:
                    base = self._base_position(segment.key, chunk_index, recompute_keys, on_missing)
                if base is None:
                    recomputed.append(chunk_index)
                    recomputed_tokens += live.numel()
                    fixed.append(live)
                else:
                    cached_keys.append(segment.key)
                    cached_src.append(src_offset + live - pos)
                    cached_dst.append(live)
                    cached_delta.append(torch.full((live.numel(),), pos - base))
                    heads.append(live[live < pos + config.head_tokens])
                    picks.append(live[live < pos + config.epic_tokens] if config.policy == "epic" else
                                 live if config.selects else live[:0])
                    src_offset += n
            else:
                chunk_index += 1
            pos += n
        cat = lambda xs: torch.cat(xs) if xs else torch.empty(0, dtype=torch.int64)  # noqa: E731
        fixed_rows = cat(fixed)
        logits_rows = {"last": torch.arange(T - 1, T), "suffix": torch.arange(layout.suffix_start, T),
                       "none": torch.empty(0, dtype=torch.int64)}[logits_at]
        return BlendPlan(
            layout=layout,
            config=config,
            ids=layout.token_ids(),
            positions=torch.arange(T),
            cached_keys=cached_keys,
            cached_src=cat(cached_src),
            cached_rows=cat(cached_dst),
            cached_delta=cat(cached_delta),
            fixed_rows=fixed_rows,
            initial_rows=torch.cat([fixed_rows, cat(picks)]).sort().values,  # disjoint: picks are cached rows
            logits_rows=logits_rows,
            head_rows=cat(heads),
            exact_prefix=exact_prefix,
            recomputed_chunks=recomputed,
            recomputed_tokens=recomputed_tokens,
            cached_lengths=tuple(d.numel() for d in cached_dst),
        )

    def _base_position(self, key: ChunkKey, index: int, recompute_keys: Sequence[ChunkKey], on_missing: str) -> int | None:
        """The position the chunk's cached K was computed at, or None if the chunk must be recomputed."""
        if key in recompute_keys:
            reason = "failed to load"
        else:
            entry = None if self.store is None else self.store.get(key, layers=(0,), expect=kv_layout(self.model.spec))
            if entry is not None:
                return entry.base_position
            if on_missing == "error":
                raise LayoutError(f"chunk {index} (key {key.digest[:12]}) is not in the store")
            reason = "is not in the store"
        log.warning("chunk %d (key %s) %s: recomputing it", index, key.digest[:12], reason)
        return None

    def start(self, plan: BlendPlan, source: LayerSource | None = None,
              prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None, target: KVTarget | None = None,
              tier: str | None = None) -> BlendRun:
        """A run ready to step layer by layer; the source defaults to layer-sliced reads from the store (from
        `tier` if given), the target to dense per-layer K/V (`DenseKV`)."""
        if plan.cached_keys and source is None:
            if self.store is None:
                raise ValueError("the plan reuses cached chunks but the engine has no store or source")
            source = StoreLayerSource(self.store, plan.cached_keys, self.model.device, kv_layout(self.model.spec),
                                      tier=tier)
        if plan.exact_prefix and prefix_kv is None:
            raise ValueError("the plan expects exact prefix KV but none was given")
        ahead = None
        if plan.config.policy == "cacheblend" and plan.config.weighting != "check" and plan.cached_keys:
            if self.store is None:
                raise ValueError(f"weighting {plan.config.weighting!r} runs a question pass that reads the chunks' "
                                 "KV from the engine's store, and this engine has none")
            ahead, token_layers = self._question_pass(plan, prefix_kv, tier)
        run = BlendRun(self, plan, source, prefix_kv, target, ahead)
        if ahead is not None:
            run.stats.token_layers_computed += token_layers
        return run

    def _question_pass(self, plan: BlendPlan, prefix_kv, tier) -> tuple[torch.Tensor, int]:
        """ProphetKV's first stage: the prompt's own rows (prefix, question) through every layer over the reused
        chunk KV; the attention the question pays each row, normalised per layer over the chunk rows and averaged
        over the layers [tokens], and the token-layers it computed."""
        reuse = replace(plan, config=replace(plan.config, policy="full_reuse", gate_bound=None),
                        initial_rows=plan.fixed_rows, logits_rows=plan.logits_rows[:0])
        source = StoreLayerSource(self.store, plan.cached_keys, self.model.device, kv_layout(self.model.spec), tier=tier)
        run = BlendRun(self, reuse, source, prefix_kv)
        run.collect = []
        try:
            for layer in range(self.model.spec.num_layers):
                run.step(layer)
        finally:
            source.close()
        cached = run.plan.cached_rows.to(self.model.device)
        received = self.model.heads_sum(torch.stack(run.collect))  # every layer's, over every rank's heads at once
        fused = torch.stack([a / a[cached].mean().clamp_min(1e-30) for a in received]).mean(0)
        return fused, run.stats.token_layers_computed

    @torch.inference_mode()
    def run(self, plan: BlendPlan, source: LayerSource | None = None,
            prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None, target: KVTarget | None = None,
            tier: str | None = None, profile: bool = False) -> BlendResult:
        """`profile`: the stats' stage times are device times (`BlendRun.start_profile`; on a GPU only)."""
        run = self.start(plan, source, prefix_kv, target, tier)
        if profile and self.model.device.type == "cuda":
            run.start_profile()
        try:
            first = run.graphs_from()
            if self.check_graphs is not None and self.check_graphs.applies(run, first):
                self.check_graphs.run(run, first)
            else:
                for layer in range(first):
                    run.step(layer)
            if first < self.model.spec.num_layers:
                run.graphs.run(run, first)
            elif run.graphs is not None:
                run.stats.graphs = "not used: the last check layer is the model's last"
        except BaseException:
            if run.source is not None:
                run.source.close()
            raise
        return run.finish()

    def blend(self, layout: PromptLayout, config: BlendConfig, logits_at: str = "last", on_missing: str = "error",
              exact_prefix: int = 0, prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
              target: KVTarget | None = None, tier: str | None = None, profile: bool = False) -> BlendResult:
        """Plan and run from the store (reading from `tier`, if given); a chunk whose entry fails mid-run is
        recomputed instead (and logged). `profile`: as `run`'s."""
        failed: list[ChunkKey] = []
        while True:
            plan = self.plan(layout, config, logits_at=logits_at, exact_prefix=exact_prefix,
                             recompute_keys=failed, on_missing=on_missing)
            try:
                result = self.run(plan, prefix_kv=prefix_kv, target=target, tier=tier, profile=profile)
            except ChunkLoadError as exc:
                log.warning("%s; recomputing that chunk instead", exc)
                failed.append(exc.key)
                continue
            return result
