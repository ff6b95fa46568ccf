"""Deployment secret through StoreConfig and the tiers, and no credential in a log line, an error or a repr."""

import logging

import pytest

from kvblend.store import DiskTier, RedisConfig, RedisTier, StoreConfig, open_store, redact_url
from kvblend.store.entry import SECRET_ENV
from test_store_helpers import assert_same_kv, random_chunk, split_entry

SECRET = "store-security-test-secret-0001"
PASSWORD = "s3cr3t-Pa55word"


@pytest.mark.parametrize(
    "url,shown",
    [
        (f"redis://user:{PASSWORD}@cache.internal:6379/0", "redis://user:***@cache.internal:6379/0"),
        (f"redis://:{PASSWORD}@127.0.0.1/2", "redis://:***@127.0.0.1/2"),
        (f"rediss://{PASSWORD}@cache.internal:6380", "rediss://***@cache.internal:6380"),
        (f"redis://127.0.0.1:6379/0?password={PASSWORD}&socket_timeout=2",
         "redis://127.0.0.1:6379/0?password=***&socket_timeout=2"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (f"unix://:{PASSWORD}@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ],
)
def test_redact_url_hides_passwords_only(url, shown):
    assert redact_url(url) == shown


def test_no_password_in_outage_logs_errors_or_reprs(caplog):
    url = f"redis://admin:{PASSWORD}@127.0.0.1:1/0"  # nothing listens on port 1
    tier = RedisTier(RedisConfig(url, timeout_s=0.3, retry_s=60))
    kv = random_chunk(seed=1)
    with caplog.at_level(logging.WARNING, logger="kvblend.store"):
        assert tier.get(kv.key) is None
        assert tier.put(kv.key, kv) is False
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    assert PASSWORD not in caplog.text and "admin:***@127.0.0.1:1" in caplog.text
    config = StoreConfig(redis_url=url, secret=SECRET)
    for text in (repr(tier.config), repr(config), str(config), repr(tier.stats())):
        assert PASSWORD not in text and SECRET not in text
    with pytest.raises(ValueError) as info:
        RedisConfig(f"http://admin:{PASSWORD}@127.0.0.1:6379")
    assert PASSWORD not in str(info.value)


def test_store_secret_comes_from_the_environment_and_must_be_long(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert StoreConfig().secret == SECRET
    monkeypatch.setenv(SECRET_ENV, "too-short")
    with pytest.raises(ValueError, match=SECRET_ENV) as info:
        StoreConfig()
    assert "too-short" not in str(info.value)
    monkeypatch.delenv(SECRET_ENV)
    assert StoreConfig().secret is None


def test_store_with_a_secret_writes_macs_and_refuses_unauthenticated_entries(tmp_path, redis_url, redis_prefix, caplog):
    kv, plain = random_chunk(seed=2), random_chunk(seed=3)
    config = StoreConfig(memory_bytes=1 << 20, disk_dir=str(tmp_path / "kv"), secret=SECRET)
    with open_store(config) as store:
        store.put(kv.key, kv)
        store.flush()
        disk = store.tiers[1]
        assert split_entry(disk.path(kv.key).read_bytes())[1]["check"] == "blake3-keyed"
        unkeyed = DiskTier(tmp_path / "kv", 1 << 30)  # a writer without the secret shares the directory
        unkeyed.put(plain.key, plain)
        with caplog.at_level(logging.WARNING, logger="kvblend.store"):
            assert store.get(plain.key) is None
        assert disk.path(plain.key).exists(), "a refused entry is kept (a writer with the secret replaces it)"
        assert "refusing" in caplog.text
        assert unkeyed.get(kv.key) is None and disk.path(kv.key).exists()  # and the other way round
    with open_store(config) as store:  # a restart: the memory tier is empty, the disk entry verifies
        assert_same_kv(store.get(kv.key, None, kv.layout), kv)
    signed = RedisTier(RedisConfig(redis_url, prefix=redis_prefix), SECRET)
    signed.put(kv.key, kv)
    assert_same_kv(signed.get(kv.key, [1, 3], kv.layout), kv, layers=[1, 3])
    assert RedisTier(RedisConfig(redis_url, prefix=redis_prefix)).get(kv.key) is None
    assert RedisTier(RedisConfig(redis_url, prefix=redis_prefix), "another-secret-0123456789").get(kv.key) is None
    assert_same_kv(signed.get(kv.key), kv)  # refused entries are not deleted from the shared server
