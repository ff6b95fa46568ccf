"""CUDA graphs of the blend's layers after its last check layer, where the active rows no longer change.

From there every layer runs the same kernels on the same shapes, so one graph per layer replays them with one
launch (the host cost of ~15 launches per layer was the 3k prompt's floor). Graphs are captured per (active-row
bucket, prompt-length bucket, logits rows), as vLLM does for decode: the active rows are padded at the front
with copies of the first one (same position, same hidden state, so the copies write identical K/V), and keys
past the prompt get a position no query reaches. Graphs read and write static buffers and the KV workspace of
their prompt-length bucket, so a run's K/V are views of that workspace, valid until the engine's next run.
A bucket's first request runs the same code eagerly (compiling every kernel) and captures after it.

With `staging` (vLLM's paged cache: `kvblend.vllm.paged_target.PagedKV`) the target keeps one staging pair that
every layer rewrites and then commits to its own blocks: the workspace holds that one layer, grown to the longest
prompt seen (growing drops the graphs, which read the old one), and each layer's commit runs eagerly after its
graph, since the slots it writes belong to the request. The most recently used MAX_BUCKETS buckets are kept.
A capture that fails turns the graphs off for the engine (logged): the run that captured had already run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvblend.model.runner import LlamaModel
from kvblend.triton_kernels import sparse_query_attention

log = logging.getLogger(__name__)

ROW_BUCKET = 32
KEY_BUCKET = 1024
UNREACHABLE = 1 << 62  # the position of workspace keys past the prompt: after every query's
MAX_BUCKETS = 16


def bucket(n: int, step: int) -> int:
    """n rounded up to a multiple of step."""
    return -(-n // step) * step


@dataclass
class LayerGraphs:
    """One captured bucket: static inputs, the per-layer graphs, the last layer's output rows."""

    rows: torch.Tensor
    q_pos: torch.Tensor
    rot: tuple[torch.Tensor, torch.Tensor] | None  # the model's rotation of q_pos (None: its qkv rotates itself)
    h: torch.Tensor
    n_logits: int
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    out: torch.Tensor | None = None
    capture_ms: float = 0.0
    pool_bytes: int = 0


class PostCheckGraphs:
    """Captures and replays the post-check layers of blend runs on one CUDA model."""

    def __init__(self, model: LlamaModel, staging: bool = False, scale: float | None = None) -> None:
        """`staging`: one staging layer committed by the target after each layer (see above); `scale`: the
        attention's softmax scale (None: 1/sqrt(head_dim))."""
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")
        self.model, self.staging, self.scale = model, staging, scale
        self._workspaces: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._entries: OrderedDict[tuple[int, int, int, int], LayerGraphs] = OrderedDict()
        self._pool = None
        self.failure: str | None = None  # why the graphs are off (a failed capture or replay check); None: on

    def turn_off(self, reason: str) -> None:
        """No more graphs for this engine (its runs go eager), for `reason` (logged, and kept in `failure`)."""
        self.failure = reason
        self._entries.clear()
        log.warning("kvblend: the blend's post-check CUDA graphs are off: %s", reason)

    def applies(self, plan) -> bool:
        """Whether these graphs serve a plan: they are on, and it has layers with a fixed set of active rows that are
        not all rows (those run causal SDPA)."""
        return self.failure is None and (plan.config.selects or plan.initial_rows.numel() < plan.ids.shape[0])

    def workspace(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [layers, tokens, kv_heads, head_dim]: views of the workspace of the prompt-length bucket
        (with `staging`, the staging pair [tokens, kv_heads, head_dim])."""
        k, v, _ = self._workspace(bucket(tokens, KEY_BUCKET))
        if self.staging:
            return k[0, :tokens], v[0, :tokens]
        return k[:, :tokens], v[:, :tokens]

    def holds(self, target) -> bool:
        """Whether `target`'s layer buffers are views of this engine's workspace (what the graphs read)."""
        k = target.layer(0)[0]
        return any(k.data_ptr() == ws[0].data_ptr() for ws in self._workspaces.values())

    def _workspace(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V [layers (1 with staging), capacity, kv_heads, head_dim] and the keys' positions [capacity]."""
        if self.staging:
            grown = max(self._workspaces, default=0)
            if grown < capacity:  # one staging pair, grown: the graphs captured on the old one go with it
                self._entries.clear()
                self._workspaces = {capacity: self._new_workspace(1, capacity)}
                grown = capacity
            k, v, pos = self._workspaces[grown]
            return k[:, :capacity], v[:, :capacity], pos[:capacity]
        if capacity not in self._workspaces:
            self._workspaces[capacity] = self._new_workspace(self.model.spec.num_layers, capacity)
        return self._workspaces[capacity]

    def _new_workspace(self, layers: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.model.spec
        # zeros: keys past the prompt are read (masked) in a tile's last key block, so they must be finite
        k = torch.zeros(layers, capacity, s.num_kv_heads, s.head_dim, dtype=self.model.dtype, device=self.model.device)
        return k, torch.zeros_like(k), torch.empty(capacity, dtype=torch.int64, device=self.model.device)

    def stats(self) -> list[dict]:
        """Per captured bucket: rows, keys, capture time and the graph pool's memory."""
        return [{"rows": key[0], "keys": key[1], "logits_rows": key[2], "first_layer": key[3],
                 "capture_ms": round(e.capture_ms, 1), "pool_MiB": round(e.pool_bytes / 2**20, 1)}
                for key, e in self._entries.items()]

    def workspace_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v, _ in self._workspaces.values())

    def run(self, run, first: int) -> None:
        """Layers first.. of a BlendRun whose active rows are final: eager the first time of a bucket, then
        captured; replayed after that. Leaves the last layer's hidden states (the logits rows) in run.h."""
        model, rows = self.model, run.rows
        tokens, n = run.plan.ids.shape[0], rows.numel()
        capacity = bucket(tokens, KEY_BUCKET)
        n_logits = run.plan.logits_rows.numel()
        key = (bucket(n, ROW_BUCKET), capacity, n_logits, first)
        entry = self._entries.get(key)
        fresh = entry is None
        if fresh:
            entry = self._new_entry(key[0], n_logits)
        else:
            self._entries.move_to_end(key)
        self._fill(entry, run, capacity, tokens)
        layers = range(first, model.spec.num_layers)
        for layer in layers:
            run.fill_cached(layer)
            start = time.perf_counter()
            if fresh:
                self._layer(entry, layer, capacity)
            else:
                entry.graphs[layer - first].replay()
            run.target.commit(layer)
            run._tick("post_check_graphs", start)  # the layer's own time: its fill is in the fill's stages
            run.stats.token_layers_computed += n
        run.h = entry.out
        run.stats.graphs = "captured" if fresh else "replayed"
        if fresh:
            try:
                self._capture(entry, layers, capacity)
            except Exception as exc:  # this run's layers ran eagerly above: its result stands
                self.turn_off(f"capture failed: {type(exc).__name__}: {exc}")
                run.stats.graphs = f"off: {self.failure}"
                return
            self._entries[key] = entry
            if len(self._entries) > MAX_BUCKETS:
                self._entries.popitem(last=False)

    def _new_entry(self, rows: int, n_logits: int) -> LayerGraphs:
        s, device = self.model.spec, self.model.device
        q_pos = torch.zeros(rows, dtype=torch.int64, device=device)
        return LayerGraphs(rows=torch.zeros(rows, dtype=torch.int64, device=device), q_pos=q_pos,
                           rot=self.model.rotary(q_pos),
                           h=torch.empty(rows, s.hidden_size, dtype=self.model.dtype, device=device),
                           n_logits=n_logits)

    def _fill(self, entry: LayerGraphs, run, capacity: int, tokens: int) -> None:
        """The run's active rows (padded at the front), their hidden states, positions and rotations."""
        pad = entry.rows.numel() - run.rows.numel()
        entry.rows[:pad] = run.rows[:1].expand(pad)
        entry.rows[pad:] = run.rows
        entry.h[:pad] = run.h[:1].expand(pad, -1)
        entry.h[pad:] = run.h
        torch.index_select(run.positions, 0, entry.rows, out=entry.q_pos)
        if entry.rot is not None:
            for static, value in zip(entry.rot, self.model.rotary(entry.q_pos)):
                static.copy_(value)
        k_pos = self._workspace(capacity)[2]
        k_pos[:tokens] = run.positions
        k_pos[tokens:] = UNREACHABLE

    def _layer(self, entry: LayerGraphs, layer: int, capacity: int) -> None:
        """One post-check layer on the static buffers (the body each graph captures)."""
        model = self.model
        ws_k, ws_v, k_pos = self._workspace(capacity)
        at = 0 if self.staging else layer
        K, V = ws_k[at], ws_v[at]
        q, k, v = model.qkv(layer, entry.h, entry.q_pos, entry.rot)
        K[entry.rows], V[entry.rows] = k, v
        h, q_pos = entry.h, entry.q_pos
        if layer == model.spec.num_layers - 1:
            n = entry.n_logits
            q, h, q_pos = q[q.shape[0] - n :], h[h.shape[0] - n :], q_pos[q_pos.shape[0] - n :]
            if n == 0:
                entry.out = h
                return
        attn = sparse_query_attention(q, q_pos, K, V, k_pos, scale=self.scale, keys_sorted=True)
        out = model.finish_layer(layer, h, attn.reshape(attn.shape[0], -1))
        if layer == model.spec.num_layers - 1:
            entry.out = out
        else:
            entry.h.copy_(out)

    def capture(self, body) -> torch.cuda.CUDAGraph:
        """A graph of what `body()` launches, in the memory pool every graph of this engine shares (they never
        run at the same time; a graph's outputs are read before the next graph runs). Thread-local capture: a
        layer source's fetch thread may pin and copy meanwhile (on its own streams)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            body()
        if self._pool is None:
            self._pool = graph.pool()
        return graph

    def _capture(self, entry: LayerGraphs, layers: range, capacity: int) -> None:
        """Record each layer's body into its graph (recording runs nothing); all buckets share one memory pool,
        as their graphs never run at the same time."""
        torch.cuda.synchronize(self.model.device)
        torch.cuda.empty_cache()  # as capture itself does: the reserved growth below is then the graph pool's
        reserved = torch.cuda.memory_reserved(self.model.device)
        start = time.perf_counter()
        for layer in layers:
            entry.graphs.append(self.capture(lambda: self._layer(entry, layer, capacity)))  # noqa: B023
        torch.cuda.synchronize(self.model.device)
        entry.capture_ms = (time.perf_counter() - start) * 1e3
        entry.pool_bytes = torch.cuda.memory_reserved(self.model.device) - reserved
