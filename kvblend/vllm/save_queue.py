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
import time
from collections.abc import Callable, Sequence

import torch

from kvblend.store.key import ChunkKey

log = logging.getLogger(__name__)

PENDING_SHARE, PENDING_CAP = 4, 4 << 30  # device copies waiting: a quarter of the free GPU memory, at most 4 GiB
GROUP_BYTES = 512 << 20  # a run of adjacent spans copied out of the paged cache in one gather per layer


def save_groups(spans: Sequence, token_bytes: int, cap: int = GROUP_BYTES) -> list[list]:
    """`spans` (with start, end; in prompt order) cut into runs of adjacent spans of at most `cap` bytes at
    `token_bytes` a token (a span larger than `cap` is a run of its own): each run is copied out of vLLM's blocks
    with one gather per layer. Per span, a 16k-token prompt's 64 spans took ~20k launches."""
    groups: list[list] = []
    size = 0
    for span in spans:
        nbytes = (span.end - span.start) * token_bytes
        if groups and groups[-1][-1].end == span.start and size + nbytes <= cap:
            groups[-1].append(span)
            size += nbytes
        else:
            groups.append([span])
            size = nbytes
    return groups


def pending_budget(device: torch.device) -> int:
    """Bytes of spans' device copies that may wait for the thread before `submit` blocks the step: a quarter of the
    GPU memory free when the queue starts (vLLM's KV cache is allocated by then), at most PENDING_CAP."""
    free, _ = torch.cuda.mem_get_info(device)
    return min(free // PENDING_SHARE, PENDING_CAP)


class SaveQueue:
    """One background thread that moves spans' K/V from the GPU to pinned host memory and hands them to `put(key,
    k, v, ids, base_position)` (the worker's own store step). `submit` blocks while the spans already waiting hold
    `budget` bytes of device copies (one span is always let through), so a long prompt's spans rarely stall the
    step that computed them, and GPU memory stays bounded."""

    def __init__(self, device: torch.device,
                 put: Callable[[ChunkKey, torch.Tensor, torch.Tensor, list[int], int], None],
                 budget: int | None = None) -> None:
        self._put = put
        self.budget = pending_budget(device) if budget is None else budget
        self._stream = torch.cuda.Stream(device)
        self._jobs: queue.Queue = queue.Queue()
        self._pending = 0
        self._room = threading.Condition()
        self.host_ms = 0.0  # the thread's time in pinned host copies (allocation included), for the worker's log
        self._thread = threading.Thread(target=self._run, name="kvblend-save", daemon=True)
        self._thread.start()

    def submit(self, key: ChunkKey, k: torch.Tensor, v: torch.Tensor, ids: list[int], base_position: int) -> None:
        """Queue a span whose K/V [layers, tokens, kv_heads, head_dim] were just copied on the current stream."""
        nbytes = k.nbytes + v.nbytes
        with self._room:
            self._room.wait_for(lambda: self._pending == 0 or self._pending + nbytes <= self.budget)
            self._pending += nbytes
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(k.device))
        self._jobs.put((key, k, v, ids, base_position, ready))

    def _to_host(self, k: torch.Tensor, v: torch.Tensor, ready: torch.cuda.Event) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned host copies of k and v, made on the side stream once `ready` has passed on the compute stream."""
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            host_k = torch.empty(k.shape, dtype=k.dtype, pin_memory=True).copy_(k, non_blocking=True)
            host_v = torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
        self._stream.synchronize()  # the device copies may be freed (and reused) only after this
        return host_k, host_v

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            key, k, v, ids, base_position, ready = job
            try:
                start = time.perf_counter()
                host = self._to_host(k, v, ready)
                self.host_ms += (time.perf_counter() - start) * 1e3
                self._put(key, *host, ids, base_position)
            except Exception as exc:  # storing is best effort: the request itself is already served
                log.warning("could not store %s (%s: %s); a later request recomputes it", key, type(exc).__name__, exc)
            finally:
                nbytes = k.nbytes + v.nbytes
                job = k = v = None  # the device copies go now, not when the next span arrives
                with self._room:
                    self._pending -= nbytes
                    self._room.notify_all()

    def close(self) -> None:
        """Store what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()
