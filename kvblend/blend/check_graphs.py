"""CUDA graphs of a blend's layers up to its last check layer, replayed when a prompt's shape repeats.

Before the last check layer the active rows shrink at each check, but every count is known on the host from the
plan (the selection is sync-free), so for one prompt shape every request launches the same kernels on the same
shapes: one graph per layer captures `BlendRun.compute` on static inputs (hidden states, active rows, positions,
chunk and head masks), and the cached-KV fill between graphs stays eager (it waits on the layer source). On a
3k prompt these ~150 launches were the host-bound part of the request. The shapes are exact (a padded row
would join the selection), so a shape is captured the second time it is seen (a prompt length seen once pays no
capture) and the MAX_SHAPES most recently used are kept. Graphs share the post-check graphs' memory pool and
KV workspace (`PostCheckGraphs`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch

from kvblend.blend.cuda_graphs import PostCheckGraphs

MAX_SHAPES = 8
MAX_SEEN = 1024  # shapes remembered as seen once (forgotten all at once past this)


@dataclass
class CheckLayerEntry:
    """One captured shape: the static inputs, one graph per layer, the run state the last graph leaves."""

    h: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    is_cached: torch.Tensor
    is_head: torch.Tensor
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    chunk_rows_active: list[int] = field(default_factory=list)  # the run's count before each layer
    out_h: torch.Tensor | None = None
    out_rows: torch.Tensor | None = None
    out_rot: tuple[torch.Tensor, torch.Tensor] | None = None
    n_chunk_active: int = 0
    token_layers: int = 0
    capture_ms: float = 0.0
    pool_bytes: int = 0


class CheckLayerGraphs:
    """Captures and replays the layers before the post-check graphs (`first`) of blend runs on one CUDA model."""

    def __init__(self, post: PostCheckGraphs) -> None:
        self.post = post
        self._seen: set[tuple] = set()
        self._entries: OrderedDict[tuple, CheckLayerEntry] = OrderedDict()

    @staticmethod
    def applies(run, first: int) -> bool:
        """Runs with post-check graphs, layers before them, and no host-side draw (the random policy draws its
        scores on the host), quality gate (it reads its signal on the host), question pass (its attention is a
        per-request tensor a graph would not re-read) or profile (its stage events would be captured)."""
        return (run.graphs is not None and 0 < first < run.model.spec.num_layers and not run.profile
                and run.plan.config.policy != "random" and run.gate is None and run.question_attention is None)

    @staticmethod
    def shape(run, first: int) -> tuple:
        """Everything the captured layers' kernels and shapes depend on."""
        return (run.plan.ids.shape[0], run.rows.numel(), run._n_chunk_active, run._n_cached, run._n_suffix,
                run._n_heads > 0, run.plan.config, first)

    def stats(self) -> list[dict]:
        return [{"tokens": key[0], "rows": key[1], "layers": key[-1], "capture_ms": round(e.capture_ms, 1),
                 "pool_MiB": round(e.pool_bytes / 2**20, 1)} for key, e in self._entries.items()]

    def run(self, run, first: int) -> None:
        """Layers 0..first-1 of `run`: replayed if its shape was captured, else eager (and captured after them
        when the shape was seen before). Leaves the run's state as the eager layers would."""
        key = self.shape(run, first)
        entry = self._entries.get(key)
        if entry is None:
            rows, n_chunk_active = run.rows.numel(), run._n_chunk_active
            for layer in range(first):
                run.step(layer)
            if key in self._seen:
                self._entries[key] = self._capture(run, first, rows, n_chunk_active)
                if len(self._entries) > MAX_SHAPES:
                    self._entries.popitem(last=False)
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen.add(key)
            return
        self._entries.move_to_end(key)
        for static, value in ((entry.h, run.h), (entry.rows, run.rows), (entry.positions, run.positions),
                              (entry.is_cached, run.is_cached), (entry.is_head, run.is_head)):
            static.copy_(value)
        for layer in range(first):
            run._n_chunk_active = entry.chunk_rows_active[layer]  # whether fill_cached loads this layer
            run.fill_cached(layer)
            entry.graphs[layer].replay()
        run.h, run.rows, run._rot = entry.out_h, entry.out_rows, entry.out_rot
        run._n_chunk_active = entry.n_chunk_active
        run.stats.token_layers_computed += entry.token_layers
        run.target.rows_changed()

    def _capture(self, run, first: int, rows: int, n_chunk_active: int) -> CheckLayerEntry:
        """Record `compute` of layers 0..first-1 on static inputs of the run's initial shapes (recording runs
        nothing, so the run's own state, already past these layers, is untouched: a shallow copy records)."""
        device = run.model.device
        entry = CheckLayerEntry(h=torch.empty(rows, run.h.shape[1], dtype=run.h.dtype, device=device),
                                rows=torch.empty(rows, dtype=torch.int64, device=device),
                                positions=torch.empty_like(run.positions), is_cached=torch.empty_like(run.is_cached),
                                is_head=torch.empty_like(run.is_head))
        shadow = copy.copy(run)
        shadow.stats = dataclasses.replace(run.stats, token_layers_computed=0, stage_ms=defaultdict(float))
        shadow.h, shadow.rows, shadow.positions = entry.h, entry.rows, entry.positions
        shadow.is_cached, shadow.is_head = entry.is_cached, entry.is_head
        shadow._rot, shadow._n_chunk_active = None, n_chunk_active
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # as capture itself does: the reserved growth below is then the graph pool's
        reserved = torch.cuda.memory_reserved(device)
        start = time.perf_counter()
        for layer in range(first):
            entry.chunk_rows_active.append(shadow._n_chunk_active)
            entry.graphs.append(self.post.capture(lambda: shadow.compute(layer)))  # noqa: B023
        torch.cuda.synchronize(device)
        entry.capture_ms = (time.perf_counter() - start) * 1e3
        entry.pool_bytes = torch.cuda.memory_reserved(device) - reserved
        entry.out_h, entry.out_rows, entry.out_rot = shadow.h, shadow.rows, shadow._rot
        entry.n_chunk_active, entry.token_layers = shadow._n_chunk_active, shadow.stats.token_layers_computed
        return entry
