"""Byte budgets at every tier (memory and disk LRU: test_store_tiers.py): the Redis tier's server-side LRU
budget shared by writers, its TTL, a server that refuses writes (maxmemory), and the counter ledger that
`kvblend stats` reads, on real files and a real redis-server."""

import logging
import os
import time

from kvblend.cli import main
from kvblend.store import DiskTier, MemoryTier, RedisConfig, RedisTier, StoreConfig, TieredStore, open_store
from kvblend.store.ledger import RedisLedger
from kvblend.store.entry import serialize
from redis_server import RedisServer
from test_store_helpers import assert_same_kv, random_chunk


def _redis(url, prefix, **kw) -> RedisTier:
    return RedisTier(RedisConfig(url, prefix=prefix, timeout_s=2.0, **kw))


def test_redis_lru_honours_its_budget_across_writers(redis_url, redis_prefix):
    chunks = [random_chunk(seed=s) for s in range(5)]
    size = len(serialize(chunks[0]))
    budget = 3 * size + size // 2
    host_a, host_b = _redis(redis_url, redis_prefix, max_bytes=budget), _redis(redis_url, redis_prefix, max_bytes=budget)
    a, b, c, d, e = chunks
    for kv in (a, b, c):
        assert host_a.put(kv.key, kv)
        time.sleep(0.002)  # distinct last-use times (milliseconds)
    assert host_b.get(a.key) is not None  # another host's hit makes a the most recently used
    time.sleep(0.002)
    assert host_b.put(d.key, d)  # the budget is the server's, so host b's put evicts host a's oldest entry
    assert [host_a.contains(kv.key) for kv in (a, b, c, d)] == [True, False, True, True]
    assert host_a.held_bytes() == 3 * size <= budget
    assert host_b.stats().evictions == 1 and host_a.stats().evictions == 0
    stats = host_a.stats()
    assert stats.entries == 3 and stats.bytes == 3 * size
    assert host_a.put(d.key, d) and host_a.held_bytes() == 3 * size  # overwriting counts once
    host_a.delete(c.key)
    assert host_a.held_bytes() == 2 * size
    assert host_a.put(e.key, e) and host_a.held_bytes() == 3 * size and host_a.stats().evictions == 0
    big = random_chunk(seed=9, tokens=80)
    assert not host_a.put(big.key, big)  # larger than the whole budget: refused, nothing flushed
    assert [host_a.contains(kv.key) for kv in (a, d, e)] == [True, True, True]


def test_redis_ttl_expires_unused_entries_and_their_bytes(redis_url, redis_prefix):
    tier = _redis(redis_url, redis_prefix, ttl_s=1)
    a, b, c = (random_chunk(seed=s) for s in range(3))
    size = len(serialize(a))
    assert tier.put(a.key, a) and tier.put(b.key, b)
    client = tier.client
    assert 0 < client.ttl(redis_prefix + a.key.digest) <= 1
    time.sleep(0.6)
    assert tier.get(b.key) is not None  # a hit renews b's TTL
    time.sleep(0.6)
    assert not tier.contains(a.key) and tier.contains(b.key)
    assert tier.put(c.key, c)  # the next put forgets the expired entry's bytes
    assert tier.held_bytes() == 2 * size


def test_redis_server_that_refuses_writes_is_logged_and_keeps_serving(caplog):
    server = RedisServer(extra_args=("--maxmemory", "1500kb", "--maxmemory-policy", "noeviction"))
    with server:
        tier = _redis(server.url, "kvblend:")
        first = random_chunk(seed=0)
        assert tier.put(first.key, first)
        refused = None
        with caplog.at_level(logging.WARNING, logger="kvblend.store"):
            for seed in range(1, 60):
                kv = random_chunk(seed=seed)
                if not tier.put(kv.key, kv):
                    refused = kv
                    break
        assert refused is not None, "the server's maxmemory never refused a put"
        assert any("maxmemory" in r.getMessage() for r in caplog.records), "a full server must be logged"
        assert tier.stats().errors >= 1
        assert tier.server_limits()["maxmemory_policy"] == "noeviction"
        assert_same_kv(tier.get(first.key), first)  # a refusal is not an outage: reads go on
        assert tier.get(refused.key) is None


def test_counters_from_every_process_reach_the_ledger_and_kvblend_stats(tmp_path, monkeypatch, capsys):
    config = StoreConfig(memory_bytes=1 << 20, disk_dir=str(tmp_path / "kv"), disk_bytes=1 << 22)
    chunks = [random_chunk(seed=s) for s in range(3)]
    with open_store(config) as first:
        for kv in chunks:
            first.put(kv.key, kv)
        first.flush()
        assert first.get(chunks[0].key) is not None and first.get(random_chunk(seed=7).key) is None
    with open_store(config) as second:  # another process on the same store: its memory tier starts empty
        assert second.get(chunks[1].key) is not None
        totals = second.totals()
    assert (totals["memory"].hits, totals["disk"].hits, totals["disk"].misses) == (1, 1, 1)
    assert totals["disk"].puts == 3 and totals["disk"].entries == 3
    size = len(serialize(chunks[0]))
    small = StoreConfig(memory_bytes=1 << 20, disk_dir=config.disk_dir, disk_bytes=2 * size + size // 2)
    with open_store(small) as third:
        third.put(chunks[0].key, chunks[0])  # rewriting pushes the disk over the smaller budget
    monkeypatch.setenv("KVBLEND_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["stats", "--store", config.disk_dir, "--disk-gb", str(small.disk_bytes / (1 << 30))]) == 0
    out = capsys.readouterr().out
    disk = next(line for line in out.splitlines() if line.startswith("disk"))
    assert f"entries=2 bytes={2 * size}" in disk and "hits=1 misses=1 evictions=1 puts=4" in disk
    memory = next(line for line in out.splitlines() if line.startswith("memory"))
    assert "(per process)" in memory and "hits=1 misses=2" in memory


def test_redis_only_store_keeps_its_ledger_on_the_server(redis_url, redis_prefix):

    kv = random_chunk(seed=3)
    for _ in range(2):
        redis = _redis(redis_url, redis_prefix)
        with TieredStore([MemoryTier(1 << 20), redis], ledger=RedisLedger(redis)) as store:
            store.put(kv.key, kv)
            store.flush()
            store.tiers[0].delete(kv.key)
            assert store.get(kv.key) is not None
    totals = RedisLedger(_redis(redis_url, redis_prefix)).read()
    assert totals["redis"] == {"hits": 2, "puts": 2}
    assert totals["memory"] == {"misses": 2, "puts": 4}  # each put, and each promotion of a Redis hit


def test_disk_eviction_removes_temp_files_of_dead_writers(tmp_path):
    tier = DiskTier(tmp_path / "kv", max_bytes=1 << 20)
    a = random_chunk(seed=1)
    assert tier.put(a.key, a)
    shard = tier.path(a.key).parent
    stale, fresh = shard / ".tmp-dead", shard / ".tmp-live"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x" * 100)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    tier.max_bytes = len(serialize(a)) + 10
    assert tier.put(random_chunk(seed=2).key, random_chunk(seed=2))
    assert not stale.exists() and fresh.exists() and tier.stats().evictions == 1
