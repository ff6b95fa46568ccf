"""Tensor-parallel shards without an engine: which KV heads a rank holds (as vLLM splits them), and the scheduler
side over a real store counting a span or chunk as stored only when every rank's shard is (whole KV for TP=1)."""

import random

import pytest
import torch

from kvblend.store import ChunkKey, ChunkKV, open_store
from kvblend.store.key import WHOLE
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.metadata import BlendJob, LoadJob
from kvblend.vllm.scheduler import SchedulerSide, prefix_spans
from kvblend.vllm.tensor_parallel import all_shards, kv_head_range, rank_shard

FP = "tensor-parallel-model-0001"
LAYERS, KV_HEADS, HEAD_DIM, SPAN = 2, 2, 8, 32


def test_kv_heads_split_as_vllm_splits_them():
    assert [kv_head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated heads
    assert all_shards(8, 1) == (WHOLE,)
    assert rank_shard(8, 2, 1) == "tp2.r1.h4-8"
    assert len(set(all_shards(2, 4))) == 4, "ranks holding the same replicated head still have their own shard"
    for heads, world in ((6, 4), (3, 2)):
        with pytest.raises(ValueError, match="tensor-parallel"):
            kv_head_range(heads, world, 0)


def _put(store, key: ChunkKey, ids: list[int], heads: int) -> None:
    g = torch.Generator().manual_seed(len(ids))
    shape = (LAYERS, len(ids), heads, HEAD_DIM)
    store.put(key, ChunkKV(key, torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor(ids)))


@pytest.mark.parametrize("stored_world", [1, 2])
def test_a_request_hits_only_when_every_rank_has_its_shard(tmp_path, stored_world):
    """Whole KV is a miss for a TP=2 engine and TP=2 shards are a miss for a TP=1 engine (never an error); one
    rank's shard alone is a miss; all of them (for the engine's own world size) a hit, in storage and blend mode."""
    rng = random.Random(stored_world)
    chunk = [rng.randrange(1000, 49152) for _ in range(48)]
    prompt = [rng.randrange(1000, 49152) for _ in range(2 * SPAN)] + chunk + [7, 8, 9]
    config = ConnectorConfig(store_dir=str(tmp_path), self_check=False, extract=False, span_tokens=SPAN)
    keys = [s.key for s in prefix_spans(FP, prompt, SPAN, "default")[:2]] + [ChunkKey.alone(FP, chunk)]
    shards = all_shards(KV_HEADS, stored_world)
    spans = {keys[0]: prompt[:SPAN], keys[1]: prompt[SPAN : 2 * SPAN], keys[2]: chunk}
    with open_store(config.store_config()) as store:
        for complete, part in ((stored_world == 1, shards[:1]), (True, shards[1:])):  # rank 0's, then the others'
            for key, ids in spans.items():
                for shard in part:
                    _put(store, key.for_shard(shard), ids, KV_HEADS // stored_world)
            store.flush()
            for world in (1, 2):
                scheduler = SchedulerSide(config, FP, store, shards=all_shards(KV_HEADS, world))
                hit = complete and world == stored_world
                assert scheduler.matched_tokens("s", prompt, {"kvblend": {"mode": "storage"}}, 0) == (2 * SPAN if hit else 0)
                assert isinstance(scheduler._matched.get("s"), LoadJob) == hit, (world, stored_world)
                assert scheduler.matched_tokens("b", prompt, {"kvblend": {}}, 0) == (len(prompt) - 1 if hit else 0)
                assert isinstance(scheduler._matched.get("b"), BlendJob) == hit, (world, stored_world)
