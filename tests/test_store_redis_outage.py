"""The Redis tier against a private redis-server that is stopped, restarted and hung (SIGSTOP) mid-test:
no exception escapes, misses are reported, the outage is logged once, and the tier recovers."""

import logging
import time

import pytest

from kvblend.store import RedisConfig, RedisTier
from test_store_helpers import assert_same_kv, random_chunk

LOGGER = "kvblend.store.redis_tier"


def _outage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "unavailable" in r.getMessage()]


def _every_call(tier: RedisTier, kv, absent) -> None:
    """Each interface call once against a dead server: misses and failed puts, never an exception."""
    assert tier.get(kv.key) is None
    assert tier.get(kv.key, [1, 2]) is None
    assert tier.get(absent.key) is None
    assert tier.put(absent.key, absent) is False
    assert tier.put_bytes(absent.key, b"x") is False
    assert tier.contains(kv.key) is False
    tier.delete(kv.key)
    tier.prefetch([kv.key, absent.key])
    assert tier.stats().entries == 0
    assert tier.available is False


def test_stopped_server_gives_misses_logs_once_and_recovers_after_restart(private_redis, caplog):
    tier = RedisTier(RedisConfig(private_redis.url, timeout_s=0.5, retry_s=0.1))
    kv, absent = random_chunk(seed=1), random_chunk(seed=2)
    assert tier.put(kv.key, kv)
    assert_same_kv(tier.get(kv.key), kv)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    private_redis.stop()
    start = time.monotonic()
    for _ in range(4):  # spans several retry intervals, so the server is really tried again (and fails again)
        _every_call(tier, kv, absent)
        time.sleep(0.12)
    assert time.monotonic() - start < 5, "calls against a dead server must not wait"
    assert len(_outage_warnings(caplog)) == 1, caplog.text
    stats = tier.stats()
    assert stats.misses >= 12 and stats.errors >= 2 and stats.hits == 1

    private_redis.start()  # same port, empty (no persistence)
    time.sleep(0.15)  # past the retry interval
    assert tier.get(kv.key) is None  # reachable again, and the old data is gone
    assert tier.put(kv.key, kv)
    assert_same_kv(tier.get(kv.key), kv)
    assert_same_kv(tier.get(kv.key, [3]), kv, layers=[3])
    assert tier.contains(kv.key) and tier.stats().entries == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert len(_outage_warnings(caplog)) == 1


def test_server_dying_between_calls_of_a_sliced_read(private_redis, caplog):
    """Stopping the server while the tier is mid-conversation (after a successful call) still yields a miss."""
    tier = RedisTier(RedisConfig(private_redis.url, timeout_s=0.5, retry_s=0.0))
    kvs = [random_chunk(seed=s) for s in range(3)]
    for kv in kvs:
        assert tier.put(kv.key, kv)
    tier.prefetch([kvs[0].key])  # the read-ahead copy survives the outage and is still verified
    private_redis.stop()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert_same_kv(tier.get(kvs[0].key, [0]), kvs[0], layers=[0])
        assert tier.get(kvs[1].key, [0]) is None and tier.get(kvs[2].key) is None
    assert len(_outage_warnings(caplog)) == 1


def test_hung_server_times_out_into_misses(private_redis, caplog):
    timeout = 0.3
    tier = RedisTier(RedisConfig(private_redis.url, timeout_s=timeout, retry_s=0.5))
    kv = random_chunk(seed=3)
    assert tier.put(kv.key, kv)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    private_redis.pause()
    try:
        start = time.monotonic()
        assert tier.get(kv.key) is None
        first = time.monotonic() - start
        assert tier.get(kv.key, [0]) is None and tier.contains(kv.key) is False  # inside the retry window: instant
        rest = time.monotonic() - start - first
        assert first < timeout * 4, f"a hung server held a get for {first:.2f}s"
        assert rest < 0.1, f"calls inside the retry window waited {rest:.2f}s"
    finally:
        private_redis.resume()
    assert len(_outage_warnings(caplog)) == 1
    time.sleep(0.55)
    assert_same_kv(tier.get(kv.key), kv)


def test_unreachable_url_is_a_miss_not_an_error(caplog):
    tier = RedisTier(RedisConfig("redis://127.0.0.1:1/0", timeout_s=0.3, retry_s=60))  # nothing listens on port 1
    kv = random_chunk(seed=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            _every_call(tier, kv, kv)
    assert len(_outage_warnings(caplog)) == 1


def test_bad_url_is_rejected_at_configuration():
    with pytest.raises(ValueError):
        RedisConfig("http://127.0.0.1:6379")
    with pytest.raises(ValueError):
        RedisConfig("redis://127.0.0.1:6379/0", timeout_s=0)
