"""Tenants: a tenant's chunk KV is reachable only with its secret, never by naming its namespace, and discovery
never returns another tenant's chunk. The scheduler side runs on a real store; no engine starts here."""

import random

import pytest
import torch

from kvblend.store import ChunkKey, ChunkKV, StoreConfig, open_store
from kvblend.store.key import check_namespace_name, key_namespace
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.params import blend_params, parse_params, request_params
from kvblend.vllm.scheduler import SchedulerSide

FP = "tenant-test-model-0001"
ALICE, BOB = "alice-secret-0123456789", "bob-secret-9876543210x"
SERVER_KEY = "deployment-secret-0123456789"
LAYERS, HEADS, HEAD_DIM = 2, 2, 8


def test_a_tenant_namespace_is_derived_from_its_secret_and_the_server_key():
    alice = key_namespace("docs", ALICE, SERVER_KEY)
    assert alice.startswith("docs~") and len(alice) == len("docs~") + 32
    assert alice == key_namespace("docs", ALICE, SERVER_KEY), "stable across processes"
    assert len({alice, key_namespace("docs", BOB, SERVER_KEY), key_namespace("docs", ALICE, SERVER_KEY + "2"),
                key_namespace("docs", ALICE, None), key_namespace("other", ALICE, SERVER_KEY)}) == 5
    assert key_namespace("docs") == "docs" and key_namespace("docs", None, SERVER_KEY) == "docs"
    ChunkKey.alone(FP, [1, 2], alice)  # keys are made in it


def test_no_config_or_request_can_name_a_tenant_namespace():
    alice = key_namespace("default", ALICE, SERVER_KEY)
    with pytest.raises(ValueError, match="namespace"):
        check_namespace_name(alice)
    with pytest.raises(ValueError, match="namespace"):
        ConnectorConfig(namespace=alice)
    with pytest.raises(ValueError, match="namespace"):
        parse_params(request_params(alice), 10)
    with pytest.raises(ValueError, match="namespace"):
        key_namespace(alice, BOB, SERVER_KEY)


def test_tenant_secrets_are_checked_and_never_shown():
    short = "tooshort-1"
    with pytest.raises(ValueError, match="at least 16 characters") as err:
        parse_params(request_params(tenant_secret=short), 10)
    assert short not in str(err.value)
    params = parse_params(blend_params([(0, 4)], "docs", ALICE), 10)
    assert params.tenant_secret == ALICE and params.namespace == "docs"
    assert ALICE not in repr(params)


def random_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 49152) for _ in range(n)]


def put_chunk(store, ids: list[int], namespace: str) -> ChunkKey:
    key = ChunkKey.alone(FP, ids, namespace)
    g = torch.Generator().manual_seed(len(ids))
    shape = (LAYERS, len(ids), HEADS, HEAD_DIM)
    store.put(key, ChunkKV(key, torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor(ids)))
    store.flush()
    return key


@pytest.fixture
def tenants(tmp_path, monkeypatch):
    """A scheduler side (blend ready, no self-check) on a disk store with a deployment secret, holding two chunks
    stored by Alice in her tenant namespace of "default", and a prompt that contains both."""
    monkeypatch.setenv("KVBLEND_STORE_SECRET", SERVER_KEY)
    config = ConnectorConfig(store_dir=str(tmp_path / "store"), self_check=False, extract=False)
    store = open_store(config.store_config())
    chunks = [random_ids(1, 64), random_ids(2, 48)]
    alice = key_namespace("default", ALICE, SERVER_KEY)
    for ids in chunks:
        put_chunk(store, ids, alice)
    prompt = random_ids(3, 7) + chunks[0] + random_ids(4, 5) + chunks[1] + random_ids(5, 9)
    spans = [(7, 64), (7 + 64 + 5, 48)]
    yield SchedulerSide(config, FP, store), store, prompt, spans
    store.close()


def matched(scheduler, prompt, kvblend: dict, req_id: str = "r") -> int:
    return scheduler.matched_tokens(req_id, prompt, {"kvblend": kvblend}, 0)


def test_only_the_tenant_secret_reaches_the_tenant_kv(tenants):
    scheduler, _, prompt, spans = tenants
    alice = request_params("default", ALICE, mode="blend")["kvblend"]
    assert matched(scheduler, prompt, alice) == len(prompt) - 1
    job = scheduler._matched["r"]
    assert [(s.start, s.length) for s in job.chunks] == spans  # discovered in Alice's namespace
    explicit = blend_params(spans, "default", ALICE)["kvblend"]
    assert matched(scheduler, prompt, explicit) == len(prompt) - 1

    for who in (blend_params(spans, "default", BOB), blend_params(spans, "default"), blend_params(spans),
                request_params("default", BOB, mode="blend"), request_params(mode="blend")):
        assert matched(scheduler, prompt, who["kvblend"]) == 0, who  # named or discovered: misses
        assert "r" not in scheduler._matched


def test_discovery_never_returns_another_tenants_chunk(tenants):
    _, store, prompt, spans = tenants
    assert store.anchors.find(prompt, key_namespace("default", ALICE, SERVER_KEY)) == spans
    for namespace in ("default", key_namespace("default", BOB, SERVER_KEY), key_namespace("default", ALICE, None)):
        assert store.anchors.find(prompt, namespace) == []


def test_the_server_key_is_part_of_the_tenant_namespace(tmp_path, monkeypatch):
    """A server with another deployment secret derives other namespaces: Alice's secret alone is not enough."""
    monkeypatch.setenv("KVBLEND_STORE_SECRET", SERVER_KEY)
    config = ConnectorConfig(store_dir=str(tmp_path / "store"), self_check=False, extract=False)
    with open_store(config.store_config()) as store:
        ids = random_ids(6, 40)
        put_chunk(store, ids, key_namespace("default", ALICE, SERVER_KEY))
    monkeypatch.setenv("KVBLEND_STORE_SECRET", SERVER_KEY[::-1])
    other = ConnectorConfig(store_dir=str(tmp_path / "store"), self_check=False, extract=False)
    with open_store(other.store_config()) as store:
        scheduler = SchedulerSide(other, FP, store)
        prompt = [5] * 3 + ids + [6] * 3
        assert matched(scheduler, prompt, blend_params([(3, 40)], "default", ALICE)["kvblend"]) == 0


def test_a_server_that_requires_tenants_keeps_secretless_requests_off_the_store(tmp_path):
    config = ConnectorConfig(store_dir=str(tmp_path / "store"), self_check=False, require_tenant=True)
    with open_store(config.store_config()) as store:
        ids = random_ids(7, 40)
        put_chunk(store, ids, "default")
        scheduler = SchedulerSide(config, FP, store)
        prompt = [5] * 3 + ids + [6] * 3
        assert matched(scheduler, prompt, blend_params([(3, 40)])["kvblend"], "plain") == 0
        assert scheduler.finished("plain")["kvblend"]["reason"] == "tenant_required"
        put_chunk(store, ids, key_namespace("default", ALICE, StoreConfig().secret))
        assert matched(scheduler, prompt, blend_params([(3, 40)], tenant_secret=ALICE)["kvblend"], "alice") > 0
