"""Layer sources: where the blend engine gets each layer's cached chunk KV, fetched one layer ahead.

A source returns, for one layer, the K and V of all the plan's cached chunks concatenated in prompt order,
[chunk tokens, kv_heads, head_dim] on the compute device. `start(layer)` begins the fetch; `wait(layer)`
returns it, so the engine overlaps fetching layer i+1 with computing layer i.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, Sequence

import torch

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

    def close(self) -> None: ...


class StoreLayerSource:
    """Layer-sliced reads from a TieredStore on a background thread, one layer ahead of compute."""

    def __init__(self, store, keys: Sequence[ChunkKey], device: torch.device | str) -> None:
        self.store = store
        self.keys = list(keys)
        self.device = torch.device(device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvblend-layer-fetch")
        self._pending: dict[int, Future] = {}

    def _fetch(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = [], []
        for key in self.keys:
            kv = self.store.get(key, layers=(layer,))
            if kv is None:
                raise ChunkLoadError(key, layer)
            ks.append(kv.k[0])
            vs.append(kv.v[0])
        k, v = torch.cat(ks), torch.cat(vs)
        if self.device.type == "cuda":
            k, v = k.pin_memory(), v.pin_memory()
        return k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)

    def start(self, layer: int) -> None:
        if layer not in self._pending:
            self._pending[layer] = self._pool.submit(self._fetch, layer)

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.start(layer)
        return self._pending.pop(layer).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class TensorLayerSource:
    """Chunk KV already in memory: one [layers, tokens, kv_heads, head_dim] K and V tensor per chunk.

    On the compute device each layer is one concatenation. From pinned host memory to a GPU, each layer is
    copied on a side stream into one of two staging buffers and the compute stream waits on an event, so the
    copy of layer i+1 overlaps the recompute of layer i.
    """

    def __init__(self, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], device: torch.device | str) -> None:
        self.ks, self.vs = list(ks), list(vs)
        self.device = torch.device(device)
        self.num_layers = self.ks[0].shape[0]
        self._copy = self.device.type == "cuda" and self.ks[0].device.type == "cpu"
        self._pending: dict[int, object] = {}
        if self._copy:
            n = sum(k.shape[1] for k in self.ks)
            shape = (n,) + tuple(self.ks[0].shape[2:])
            self._stream = torch.cuda.Stream(self.device)
            self._staging = [(torch.empty(shape, dtype=self.ks[0].dtype, device=self.device),
                              torch.empty(shape, dtype=self.ks[0].dtype, device=self.device)) for _ in range(2)]

    def start(self, layer: int) -> None:
        if not self._copy or layer in self._pending or layer >= self.num_layers:
            return
        k_buf, v_buf = self._staging[layer % 2]
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(compute)  # the buffer's previous layer has been consumed by work enqueued so far
            offset = 0
            for k, v in zip(self.ks, self.vs):
                n = k.shape[1]
                k_buf[offset : offset + n].copy_(k[layer], non_blocking=True)
                v_buf[offset : offset + n].copy_(v[layer], non_blocking=True)
                offset += n
            done = torch.cuda.Event()
            done.record(self._stream)
        self._pending[layer] = done

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._copy:
            return (torch.cat([k[layer] for k in self.ks]).to(self.device),
                    torch.cat([v[layer] for v in self.vs]).to(self.device))
        self.start(layer)
        torch.cuda.current_stream(self.device).wait_event(self._pending.pop(layer))
        return self._staging[layer % 2]

    def close(self) -> None:
        self._pending.clear()
