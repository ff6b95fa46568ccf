"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined (CI has no GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def model_dir():
    """The embedded SmolLM2 as an HF directory (converted from the GGUF on first use, then cached)."""
    from kvblend.model.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def model_fp32(model_dir):
    from kvblend.model.runner import LlamaModel

    return LlamaModel.from_dir(model_dir, dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from kvblend.model.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


# --- Chunk KV store: a real Redis server (shared, or private per test) -------------------------------------


@pytest.fixture(scope="session")
def redis_url():
    """URL of a real Redis server shared by the session: KVBLEND_TEST_REDIS_URL (CI), else a private one."""
    from redis_server import RedisServer, RedisServerMissing, ping

    url = os.environ.get("KVBLEND_TEST_REDIS_URL")
    if url:
        if not ping(url, timeout_s=2.0):
            pytest.fail(f"KVBLEND_TEST_REDIS_URL={url} does not answer PING")
        yield url
        return
    try:
        server = RedisServer().start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc))
    try:
        yield server.url
    finally:
        server.close()


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
    from redis_server import RedisServer, RedisServerMissing

    try:
        server = RedisServer().start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty/empty_like return NaN-filled float tensors, so an output element left unwritten shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
