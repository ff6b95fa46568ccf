"""Storing a request's KV off vLLM's critical path on a GPU: the rows, already copied out of the paged blocks on the
compute stream, go to pinned host memory on a side stream and into the store from one background thread.

Measured on an H200 inside vLLM 0.26 (benchmarks/RESULTS.md, vllm_gpu_rag): storing in the step itself (an
unpinned device-to-host copy, then the store's put) made the step that prefilled a prompt 5-7x slower than plain
vLLM's, and the first token waits for that step. On a CPU engine the rows are host memory already and the put stays
in the step (the worker stores synchronously there).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

from kvblend.store.entry import ChunkKV
from kvblend.store.key import ChunkKey
from kvblend.store.tiered import TieredStore

log = logging.getLogger(__name__)

MAX_PENDING = 2  # spans waiting for the thread; each holds a device copy of its rows, so this bounds GPU memory


class SaveQueue:
    """One background thread that moves spans' K/V from the GPU to pinned host memory and puts them in `store`;
    `stored(key, ids)` is called after each put. `submit` blocks while MAX_PENDING spans wait."""

    def __init__(self, store: TieredStore, device: torch.device, stored: Callable[[ChunkKey, list[int]], None]):
        self.store, self._stored = store, stored
        self._stream = torch.cuda.Stream(device)
        self._jobs: queue.Queue = queue.Queue(MAX_PENDING)
        self._thread = threading.Thread(target=self._run, name="kvblend-save", daemon=True)
        self._thread.start()

    def submit(self, key: ChunkKey, k: torch.Tensor, v: torch.Tensor, ids: list[int], base_position: int) -> None:
        """Queue a span whose K/V [layers, tokens, kv_heads, head_dim] were just copied on the current stream."""
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(k.device))
        self._jobs.put((key, k, v, ids, base_position, ready))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            key, k, v, ids, base_position, ready = job
            try:
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    host_k = torch.empty(k.shape, dtype=k.dtype, pin_memory=True).copy_(k, non_blocking=True)
                    host_v = torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                self._stream.synchronize()  # the device copies may be freed (and reused) only after this
                del k, v
                self.store.put(key, ChunkKV(key, host_k, host_v, torch.tensor(ids), base_position=base_position))
                self._stored(key, ids)
            except Exception as exc:  # storing is best effort: the request itself is already served
                log.warning("could not store %s (%s: %s); a later request recomputes it", key, type(exc).__name__, exc)
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def flush(self) -> None:
        """Wait until every submitted span is in the store."""
        self._jobs.join()

    def close(self) -> None:
        """Store what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()
