"""Worker side of the connector: load stored spans layer by layer, run the blend engine, extract KV, self-check.

Everything here runs inside vLLM's worker process, on the tensors vLLM allocated. A failure never fails the
request: its blocks are reported as not loaded and vLLM recomputes them (kv_load_failure_policy="recompute").
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import torch

from kvblend.blend.engine import BlendEngine
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.blend.source import ChunkLoadError, StoreLayerSource
from kvblend.model.ops import ModelOps
from kvblend.model.runner import LlamaModel
from kvblend.store.entry import ChunkKV
from kvblend.store.tiered import TieredStore
from kvblend.vllm.metadata import BlendJob, KVBlendMetadata, KVBlendWorkerMeta, LoadJob, SaveJob, Span
from kvblend.vllm.paged import PagedCache, slots_for

log = logging.getLogger(__name__)
# vLLM's bf16 KV differs from the torch runner's by bf16 rounding that grows with depth (~0.01-0.03 measured);
# a wrong rope, weight or layout shows as O(1) error from layer 0 on.
CHECK_LAYER0_TOL = 0.02
CHECK_ALL_TOL = 0.1


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
    job: LoadJob
    source: StoreLayerSource
    rows: torch.Tensor
    slots: torch.Tensor
    failed: bool = False


class WorkerSide:
    def __init__(self, model_dir: str, dtype: str, block_size: int, num_kv_heads: int, head_dim: int,
                 store: TieredStore, layers: dict, cpu_ops: str = "vllm") -> None:
        self.model_dir, self.dtype, self.cpu_ops = model_dir, dtype, cpu_ops
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.store = store
        self.attention_layers = layers
        self.caches: list[PagedCache] = []
        self.failed_blocks: set[int] = set()
        self._engine: BlendEngine | None = None
        self._loads: list[_SpanLoad] = []
        self._verdict: tuple[bool, str] | None = None
        self._reports: dict[str, dict] = {}
        self._stored: list[tuple[str, list[int] | None]] = []

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ordered = sorted(kv_caches.items(), key=lambda item: layer_index(item[0]))
        self.caches = [PagedCache(self.attention_layers[name], kv, self.block_size, self.num_kv_heads, self.head_dim)
                       for name, kv in ordered]

    @property
    def engine(self) -> BlendEngine:
        """The blend engine on the checkpoint vLLM serves, loaded on first use (costs about the weights' size)."""
        if self._engine is None:
            device = self.caches[0].kv.device if self.caches else torch.device("cpu")
            model = LlamaModel.from_dir(self.model_dir, dtype=self.dtype, device=str(device))
            if device.type == "cpu" and self.cpu_ops == "vllm":
                model.ops = self._vllm_cpu_ops(model)
            self._engine = BlendEngine(model, self.store)
        return self._engine

    @staticmethod
    def _vllm_cpu_ops(model: LlamaModel) -> ModelOps:
        """vLLM's C++ kernels for RMSNorm and RoPE when they match the torch references here, else the references."""
        from kvblend.vllm.cpu_ops import VLLM_CPU_OPS, check_ops

        try:
            reason = check_ops(VLLM_CPU_OPS, model.dtype, model.spec.head_dim, model.spec.rope.style, freq=model.freq)
        except Exception as exc:  # a vLLM build without these kernels
            reason = f"vLLM's CPU kernels failed to run: {exc!r}"
        if reason:
            log.warning("kvblend blend runs on its torch ops: %s", reason)
            return model.ops
        log.info("kvblend blend runs RMSNorm and RoPE on vLLM's CPU kernels")
        return VLLM_CPU_OPS

    # -- before the forward -------------------------------------------------------------------------------
    def start_load(self, meta: KVBlendMetadata) -> None:
        for job in meta.blends:
            self._blend(job)
        for job in meta.loads:
            rows = torch.cat([torch.arange(max(s.start, job.write_from), s.end) - s.start + offset
                              for s, offset in zip(job.spans, _offsets(job.spans))])
            slots = slots_for(job.block_ids, job.write_from, job.spans[-1].end, self.block_size)
            source = StoreLayerSource(self.store, [s.key for s in job.spans], self.caches[0].kv.device)
            source.start(0)
            self._loads.append(_SpanLoad(job, source, rows, slots))

    def wait_layer(self, layer_name: str) -> None:
        """Write this layer's rows of every pending span load (the next layer is already being fetched)."""
        if not self._loads:
            return
        layer = layer_index(layer_name)
        for load in self._loads:
            if load.failed:
                continue
            try:
                k, v = load.source.wait(layer)
                if layer + 1 < len(self.caches):
                    load.source.start(layer + 1)
                self.caches[layer].write(k[load.rows], v[load.rows], load.slots)
            except ChunkLoadError as exc:
                log.warning("request %s: %s; vLLM will recompute it", load.job.req_id, exc)
                load.failed = True
                self.failed_blocks |= blocks_from(load.job.block_ids, load.job.write_from, self.block_size)
                self._reports[load.job.req_id] = {"load_error": str(exc)}
        if layer == len(self.caches) - 1:
            for load in self._loads:
                load.source.close()
            self._loads = []

    def _blend(self, job: BlendJob) -> None:
        start = time.perf_counter()
        hits_before = self.store.hits()
        try:
            report = self._run_blend(job)
            report["hits"] = {name: n - hits_before[name] for name, n in self.store.hits().items()}
        except Exception as exc:  # any failure: vLLM recomputes the request's claimed rows
            log.warning("request %s: blend failed (%s: %s); vLLM will recompute it", job.req_id, type(exc).__name__, exc)
            self.failed_blocks |= blocks_from(job.block_ids, job.num_computed, self.block_size)
            report = {"blend_error": f"{type(exc).__name__}: {exc}"}
        report["blend_ms"] = (time.perf_counter() - start) * 1e3
        self._reports[job.req_id] = report

    def _run_blend(self, job: BlendJob) -> dict:
        end = len(job.prompt) - 1
        segments, pos = [], 0
        for span in job.chunks:
            segments += [job.prompt[pos : span.start], ChunkRef(tuple(job.prompt[span.start : span.end]), span.key)]
            pos = span.end
        segments.append(job.prompt[pos:end])
        layout = PromptLayout.from_segments(segments)
        exact = max([job.num_computed] + [s.end for s in job.exact_spans])
        prefix_kv = self._exact_prefix(job, exact) if exact else None
        result = self.engine.blend(layout, job.config, logits_at="none", on_missing="recompute",
                                   exact_prefix=exact, prefix_kv=prefix_kv)
        slots = slots_for(job.block_ids, job.num_computed, end, self.block_size)
        for layer, cache in enumerate(self.caches):
            cache.write(result.k[layer, job.num_computed : end], result.v[layer, job.num_computed : end], slots)
        stats = result.stats
        return {"tokens_reused": stats.tokens_reused, "tokens_recomputed": stats.tokens_recomputed,
                "rows_computed": stats.rows_last_layer, "compute_fraction": round(stats.compute_fraction, 4),
                "recompute_ratio": stats.recompute_ratio, "exact_prefix": exact, "ops": self.engine.model.ops.name,
                "stage_ms": {k: round(v, 2) for k, v in stats.stage_ms.items()}}

    def _exact_prefix(self, job: BlendJob, exact: int) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of rows [0, exact): vLLM's own cache hit from its blocks, then exact stored spans."""
        k_parts, v_parts = [], []
        if job.num_computed:
            slots = slots_for(job.block_ids, 0, job.num_computed, self.block_size)
            reads = [cache.read(slots) for cache in self.caches]
            k_parts.append(torch.stack([k for k, _ in reads]))
            v_parts.append(torch.stack([v for _, v in reads]))
        for span in job.exact_spans:
            entry = self.store.get(span.key)
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
        if meta.check is not None and self._verdict is None:
            self._verdict = self._self_check(meta.check)
        for job in meta.saves:
            try:
                self._save(job)
            except Exception as exc:  # extraction is best effort: the request itself is already served
                log.warning("request %s: could not store its KV (%s: %s)", job.req_id, type(exc).__name__, exc)

    def _read_rows(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots_for(block_ids, start, end, self.block_size)
        reads = [cache.read(slots) for cache in self.caches]
        return torch.stack([k for k, _ in reads]), torch.stack([v for _, v in reads])

    def _save(self, job: SaveJob) -> None:
        """Copy the spans' KV out of the paged cache (the staging copy) and hand it to the store, whose slow
        tiers are written by its background thread."""
        for span in job.spans:
            k, v = self._read_rows(job.block_ids, span.start, span.end)
            ids = job.prompt[span.start : span.end]
            self.store.put(span.key, ChunkKV(span.key, k.cpu(), v.cpu(), torch.tensor(ids), base_position=span.start))
            self._stored.append((span.key.digest, ids if span.key.is_alone else None))

    def _self_check(self, job: SaveJob) -> tuple[bool, str]:
        """Compare vLLM's own KV of a prompt it just prefilled with the blend engine's full prefill of it."""
        try:
            engine = self.engine
            if engine.disabled_reason:
                return False, engine.disabled_reason
            k_vllm, v_vllm = self._read_rows(job.block_ids, 0, len(job.prompt))
            ours = engine.model.prefill(torch.tensor(job.prompt))
        except Exception as exc:
            return False, f"self-check could not run: {type(exc).__name__}: {exc}"
        errors = []
        for layer in range(len(self.caches)):
            for a, b in ((ours.k[layer], k_vllm[layer]), (ours.v[layer], v_vllm[layer])):
                errors.append(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item())
        first, worst = max(errors[:2]), max(errors)
        if first < CHECK_LAYER0_TOL and worst < CHECK_ALL_TOL:
            log.info("kvblend self-check passed: KV vs vLLM rel. error layer 0 %.4f, worst %.4f", first, worst)
            return True, ""
        reason = f"engine KV differs from vLLM's (layer 0 rel. error {first:.3f}, worst {worst:.3f})"
        log.warning("kvblend self-check failed, blending off: %s", reason)
        return False, reason

    def worker_meta(self) -> KVBlendWorkerMeta | None:
        if self._verdict is None and not self._reports and not self._stored:
            return None
        meta = KVBlendWorkerMeta(reports=self._reports, stored=self._stored)
        if self._verdict is not None:
            meta.blend_ready, meta.reason = self._verdict
        self._reports, self._stored = {}, []
        return meta

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed


def _offsets(spans: list[Span]) -> list[int]:
    """Where each span starts in the concatenation of the spans' KV."""
    out, total = [], 0
    for span in spans:
        out.append(total)
        total += span.length
    return out
