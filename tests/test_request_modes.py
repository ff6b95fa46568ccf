"""Which requests the connector blends, decided on its scheduler side over a real store (no engine starts here):
a request without kvblend parameters is served exactly unless the deployment turns discovery-blending on, and a
store request is never blended nor loaded, even when its prompt holds another stored chunk."""

import random

import pytest
import torch

from kvblend.store import ChunkKey, ChunkKV, open_store
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.metadata import BlendJob
from kvblend.vllm.scheduler import SchedulerSide

FP = "request-modes-model-0001"
LAYERS, HEADS, HEAD_DIM = 2, 2, 8


def random_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 49152) for _ in range(n)]


@pytest.fixture
def stored_chunk(tmp_path):
    """A store holding one 48-token chunk (alone, default namespace), and a prompt holding it mid-prompt."""
    store_dir = str(tmp_path / "store")
    ids = random_ids(1, 48)
    with open_store(ConnectorConfig(store_dir=store_dir).store_config()) as store:
        key = ChunkKey.alone(FP, ids, "default")
        g = torch.Generator().manual_seed(7)
        shape = (LAYERS, len(ids), HEADS, HEAD_DIM)
        store.put(key, ChunkKV(key, torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                               torch.tensor(ids)))
        store.flush()
    return store_dir, ids, random_ids(2, 9) + ids + random_ids(3, 6)


def scheduler_for(store_dir: str, **settings):
    config = ConnectorConfig(store_dir=store_dir, self_check=False, extract=False, **settings)
    store = open_store(config.store_config())
    return SchedulerSide(config, FP, store), store


def blended(scheduler: SchedulerSide, prompt: list[int], kv_transfer_params: dict | None, req_id: str) -> bool:
    matched = scheduler.matched_tokens(req_id, prompt, kv_transfer_params, 0)
    job = scheduler._matched.get(req_id)
    return matched == len(prompt) - 1 and isinstance(job, BlendJob)


def test_requests_without_kvblend_parameters_are_exact_unless_discover_blend(stored_chunk):
    store_dir, _, prompt = stored_chunk
    scheduler, store = scheduler_for(store_dir)
    with store:
        assert not blended(scheduler, prompt, None, "plain-client")
        assert not blended(scheduler, prompt, {"other_connector": {}}, "foreign-params")
        assert blended(scheduler, prompt, {"kvblend": {}}, "asked"), "a kvblend client asks by sending the key"
        assert blended(scheduler, prompt, {"kvblend": {"mode": "blend"}}, "asked-mode")
    scheduler, store = scheduler_for(store_dir, discover_blend=True)
    with store:
        assert blended(scheduler, prompt, None, "plain-client")
        assert not blended(scheduler, prompt, {"kvblend": {"mode": "storage"}}, "storage")
    with pytest.raises(ValueError, match="needs discover"):
        ConnectorConfig(store_dir=store_dir, discover=False, discover_blend=True)
    assert ConnectorConfig.from_extra({"discover_blend": True}).discover_blend


def test_a_store_request_is_never_blended_even_when_it_holds_a_stored_chunk(stored_chunk):
    store_dir, _, prompt = stored_chunk
    scheduler, store = scheduler_for(store_dir, discover_blend=True)
    with store:
        for params in ({"kvblend": {"store_prompt": True}}, {"kvblend": {"store_prompt": True, "mode": "blend"}}):
            assert scheduler.matched_tokens("store", prompt, params, 0) == 0
            assert "store" not in scheduler._matched
