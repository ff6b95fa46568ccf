"""Layer sources: where the blend engine gets each layer's cached chunk KV, fetched one layer ahead.

A source returns, for one layer, the K and V of all the plan's cached chunks, [rows, kv_heads, head_dim] on the
compute device; `rows(layer, r)` says where rows r of their concatenation in prompt order lie in them.
`start(layer)` begins the fetch; `wait(layer)` returns it, so the engine overlaps fetching layer i+1 with
computing layer i (where a core is free for it).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, Sequence

import torch

from kvblend.blend.controller import recorded_event
from kvblend.cpu import unpin_thread
from kvblend.model.spec import ModelSpec
from kvblend.store.entry import KVLayout
from kvblend.store.key import ChunkKey


class ChunkLoadError(RuntimeError):
    """A chunk's cached KV vanished or failed verification mid-run; the chunk must be recomputed."""

    def __init__(self, key: ChunkKey, layer: int) -> None:
        super().__init__(f"chunk {key.digest[:12]} layer {layer} could not be loaded from the store")
        self.key = key
        self.layer = layer


class LayerSource(Protocol):
    def start(self, layer: int) -> None: ...

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


def background_fetch_pays(device: torch.device) -> bool:
    """Fetch ahead on a thread only where it has a core to itself: with CUDA compute, or spare CPU cores. When
    torch's intra-op threads hold every core, the fetch thread stalls them at each parallel region (on 2 cores:
    the fetch-in-line row of the CPU TTFT table in benchmarks/HISTORY.md)."""
    return device.type == "cuda" or torch.get_num_threads() < (os.cpu_count() or 1)


def kv_layout(spec: ModelSpec) -> KVLayout:
    """The KV geometry every stored entry of this model must have (what store reads check entries against)."""
    return KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)


class StoreLayerSource:
    """Layer-sliced reads from a TieredStore, one layer ahead of compute on a background thread where that pays
    (`prefetch`: None decides by `background_fetch_pays`), else at `wait`."""

    def __init__(self, store, keys: Sequence[ChunkKey], device: torch.device | str, expect: KVLayout | None = None,
                 prefetch: bool | None = None, tier: str | None = None) -> None:
        """`expect`: the model's KV layout; entries of any other shape or dtype are misses. `tier`: read from
        that tier (the loading controller's choice), falling back to every tier if it lost an entry."""
        self.store = store
        self.tier = tier
        self.keys = list(keys)
        self.expect = expect
        self.device = torch.device(device)
        self.prefetch = background_fetch_pays(self.device) if prefetch is None else prefetch
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="kvblend-layer-fetch", initializer=unpin_thread)
                      if self.prefetch else None)
        self._pending: dict[int, Future] = {}

    def _fetch(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V of every chunk; entries a tier stored compressed move so and are decoded on the
        compute device."""
        entries = []
        for key in self.keys:
            kv = self.store.get(key, (layer,), self.expect, self.tier, encoded=True) if self.tier else None
            if kv is None:
                kv = self.store.get(key, layers=(layer,), expect=self.expect, encoded=True)
            if kv is None:
                raise ChunkLoadError(key, layer)
            entries.append(kv)
        if any(kv.codes is not None for kv in entries):
            entries = [kv.decoded(self.device) for kv in entries]
            return torch.cat([kv.k[0] for kv in entries]), torch.cat([kv.v[0] for kv in entries])
        k, v = torch.cat([kv.k[0] for kv in entries]), torch.cat([kv.v[0] for kv in entries])
        if self.device.type == "cuda":
            k, v = k.pin_memory(), v.pin_memory()
        return k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)

    def start(self, layer: int) -> None:
        if self.prefetch and layer not in self._pending:
            self._pending[layer] = self._pool.submit(self._fetch, layer)

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.prefetch:
            return self._fetch(layer)
        self.start(layer)
        return self._pending.pop(layer).result()

    def rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """`wait` returns the concatenation itself."""
        return rows

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def staged_rows(rows: torch.Tensor, lengths: torch.Tensor, group: int, index: int) -> torch.Tensor:
    """Where `rows` of the chunks' concatenation (prompt order; chunk token counts `lengths`, on rows' device) lie
    in a staging buffer holding `group` layers of each chunk as one block of [group, chunk tokens] rows, blocks in
    chunk order, at the layer `index` of the group. Device ops only."""
    ends = lengths.cumsum(0)
    chunk = torch.searchsorted(ends, rows, right=True)
    size = lengths[chunk]
    first = ends[chunk] - size
    return rows + (group - 1) * first + index * size


class TensorLayerSource:
    """Chunk KV already in memory: one [layers, tokens, kv_heads, head_dim] K and V tensor per chunk.

    On the compute device each layer is one concatenation. From pinned host memory to a GPU, `group` layers of
    each chunk move in one copy (a contiguous slice of its layer-major tensor) on a side stream into one of three
    staging buffers, chunk after chunk; the compute stream waits on the group's event and reads the staging
    buffer in place (`rows` maps prompt-order rows to its rows, so no per-layer concatenation). The first group's
    copy starts at construction (so it overlaps the request's planning), and each wait starts the copies of the
    next two groups, which overlap the compute of this group's layers (two ahead: copies need not keep pace).
    """

    SLOTS = 3

    def __init__(self, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], device: torch.device | str,
                 group: int = 4, timed: bool = False) -> None:
        """`timed`: time every group's copy with CUDA events (`copy_times`)."""
        self.ks, self.vs = list(ks), list(vs)
        self.device = torch.device(device)
        self.num_layers = self.ks[0].shape[0]
        self.group = group
        self._copy = self.device.type == "cuda" and self.ks[0].device.type == "cpu"
        self._pending: dict[int, object] = {}
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] | None = [] if timed else None
        self._rows: dict[int, torch.Tensor] = {}
        if self._copy:
            self._lengths = [k.shape[1] for k in self.ks]
            self._lengths_dev = torch.tensor(self._lengths).to(self.device, non_blocking=True)
            k0 = self.ks[0]
            # one allocation: [slot, K/V, group * all chunk tokens, kv_heads, head_dim]
            self._staging = torch.empty((self.SLOTS, 2, group * sum(self._lengths)) + tuple(k0.shape[2:]),
                                        dtype=k0.dtype, device=self.device)
            self._allocated = torch.cuda.Event()
            self._allocated.record(torch.cuda.current_stream(self.device))
            self._stream = torch.cuda.Stream(self.device)
            self.start(0)

    def start(self, layer: int) -> None:
        g = layer // self.group
        if not self._copy or g in self._pending or layer >= self.num_layers:
            return
        first, last = g * self.group, min((g + 1) * self.group, self.num_layers)
        compute = torch.cuda.current_stream(self.device)
        staging = self._staging[g % self.SLOTS]
        with torch.cuda.stream(self._stream):
            if g >= self.SLOTS:  # the staging buffer's previous layers were consumed by work enqueued so far
                self._stream.wait_stream(compute)
            else:  # its first use: only what ran before the allocation (the memory's earlier owners) must be done
                self._stream.wait_event(self._allocated)
            began = recorded_event() if self._timed is not None else None  # after the waits: the copies' own time
            row, nbytes = 0, 0
            for k, v, n in zip(self.ks, self.vs, self._lengths):
                block = slice(row, row + (last - first) * n)
                staging[0, block].view(last - first, n, *k.shape[2:]).copy_(k[first:last], non_blocking=True)
                staging[1, block].view(last - first, n, *v.shape[2:]).copy_(v[first:last], non_blocking=True)
                row += self.group * n
                nbytes += k[first:last].nbytes + v[first:last].nbytes
            done = torch.cuda.Event(enable_timing=self._timed is not None)
            done.record(self._stream)
        if self._timed is not None:
            self._timed.append((began, done, nbytes))
        self._pending[g] = done

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._copy:
            return (torch.cat([k[layer] for k in self.ks]).to(self.device),
                    torch.cat([v[layer] for v in self.vs]).to(self.device))
        g, i = layer // self.group, layer % self.group
        self.start(layer)
        done = self._pending[g]
        torch.cuda.current_stream(self.device).wait_event(done)
        if i == self.group - 1 or layer == self.num_layers - 1:
            del self._pending[g]
        for ahead in range(1, self.SLOTS):  # the slots of groups g+1, g+2 were last read before this layer
            self.start((g + ahead) * self.group)
        staging = self._staging[g % self.SLOTS]
        return staging[0], staging[1]

    def rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Where `rows` of the chunks' concatenation lie in what `wait(layer)` returns (the same `rows` at every
        layer: the mapping is kept per layer of a group)."""
        if not self._copy:
            return rows
        i = layer % self.group
        if i not in self._rows:
            self._rows[i] = staged_rows(rows, self._lengths_dev, self.group, i)
        return self._rows[i]

    def copy_times(self) -> dict:
        """What the timed copies moved, how long the copy stream was busy with them, and at what rate; whether
        every entry was in pinned memory (a pageable one copies at a fraction of the rate, and synchronously).
        Waits for the copies."""
        if not self._timed:
            return {}
        self._timed[-1][1].synchronize()
        busy = sum(began.elapsed_time(done) for began, done, _ in self._timed)
        nbytes = sum(n for *_, n in self._timed)
        return {"bytes": nbytes, "copies_ms": round(busy, 2), "GBps": round(nbytes / busy / 1e6, 1) if busy else None,
                "groups": len(self._timed), "pinned": all(k.is_pinned() and v.is_pinned() for k, v in zip(self.ks, self.vs))}

    def close(self) -> None:
        self._pending.clear()
