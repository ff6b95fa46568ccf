"""The Redis tier and the peer directory on a real Redis Cluster (3 masters, 3 replicas on loopback): entries
spread over the shards, the budget and LRU account hold across them, a killed shard makes its entries misses
(never an error or a wait) while the others serve, and after the cluster's failover the replicas serve them."""

import time
import uuid

import pytest

from kvblend.store import RedisConfig, RedisTier
from kvblend.store.entry import serialize
from kvblend.transport import Holder, PeerDirectory
from test_store_helpers import assert_same_kv, random_chunk

BUCKETS = 16


def cluster_tier(url: str, **options) -> RedisTier:
    options.setdefault("timeout_s", 2.0)
    return RedisTier(RedisConfig(url, prefix=f"kvblend-test:{uuid.uuid4().hex[:8]}:", **options))


def entries_by_master(tier: RedisTier) -> list[dict[bytes, int]]:
    """Per master of the cluster: each of the tier's entries it holds, with its size in bytes."""
    out = []
    for node in tier._masters():
        names = list(node.scan_iter(tier._pattern()))
        out.append({name: node.strlen(name) for name in names})
    return out


def clear(tier: RedisTier) -> None:
    for node in tier._masters():
        for name in node.scan_iter(tier.config.prefix.replace("*", "\\*") + "*"):
            node.delete(name)


def test_cluster_url_is_checked_at_construction():
    with pytest.raises(ValueError, match="database"):
        RedisConfig("redis+cluster://127.0.0.1:7000/2")
    with pytest.raises(ValueError, match="host:port"):
        RedisConfig("redis+cluster://127.0.0.1:7000,127.0.0.1")
    with pytest.raises(ValueError, match="braces"):
        RedisConfig("redis+cluster://127.0.0.1:7000", prefix="kv{x}:")


def test_entries_spread_over_the_shards_and_read_back_every_way(redis_cluster_url):
    tier = cluster_tier(redis_cluster_url)
    kvs = [random_chunk(seed=i) for i in range(24)]
    try:
        for kv in kvs:
            assert tier.put(kv.key, kv)
        for kv in kvs:
            assert_same_kv(tier.get(kv.key), kv)
            assert_same_kv(tier.get(kv.key, [3, 1]), kv, layers=[3, 1])
            assert tier.contains(kv.key)
        for kv, got in zip(kvs, tier.get_many([kv.key for kv in kvs])):  # one MGET per bucket
            assert_same_kv(got, kv)
        tier.prefetch([kv.key for kv in kvs[:6]])
        for kv in kvs[:6]:
            assert_same_kv(tier.get(kv.key), kv)
        held = entries_by_master(tier)
        assert len(held) == 3 and all(held), f"entries per master: {[len(h) for h in held]}"
        stats = tier.stats()
        assert stats.entries == 24 and stats.bytes == sum(len(serialize(kv)) for kv in kvs)
        assert stats.corrupt == 0 and stats.errors == 0
        for kv in kvs:
            tier.delete(kv.key)
        assert tier.stats().entries == 0 and tier.held_bytes() == 0
    finally:
        clear(tier)


def test_budget_and_lru_hold_across_the_shards(redis_cluster_url):
    entry = len(serialize(random_chunk(seed=0)))
    tier = cluster_tier(redis_cluster_url, max_bytes=BUCKETS * 3 * entry, buckets=BUCKETS)  # 3 entries a bucket
    kvs = [random_chunk(seed=i) for i in range(BUCKETS * 8)]
    try:
        for kv in kvs:
            assert tier.put(kv.key, kv)
        held = entries_by_master(tier)
        stored = {name.decode(): size for per_master in held for name, size in per_master.items()}
        assert all(held) and tier.counters().evictions == len(kvs) - len(stored)
        assert tier.held_bytes() == sum(stored.values()) <= tier.config.max_bytes  # the account is what is stored
        by_bucket: dict[str, list[str]] = {}
        for kv in kvs:  # in write order
            name = tier._name(kv.key)
            by_bucket.setdefault(name[: -64], []).append(name)
        for names in by_bucket.values():  # each bucket kept its most recently written entries, within its share
            kept = [name for name in names if name in stored]
            assert kept == names[len(names) - len(kept):] and 0 < len(kept) <= 3
    finally:
        clear(tier)


def test_killed_shard_gives_misses_and_the_failover_serves_them_again(private_redis_cluster):
    cluster = private_redis_cluster
    tier = cluster_tier(cluster.url, timeout_s=0.5, retry_s=0.5)
    directory = PeerDirectory(cluster.url, "a", ttl_s=30.0, timeout_s=0.5, prefix=tier.config.prefix)
    kvs = [random_chunk(seed=100 + i) for i in range(24)]
    for kv in kvs:
        assert tier.put(kv.key, kv)
        directory.announce(kv.key.digest, b"record")
    cluster.replicate()
    dead = cluster.master_of(tier._name(kvs[0].key))
    on_dead = [cluster.master_of(tier._name(kv.key)) is dead for kv in kvs]
    cluster.kill(dead)

    start = time.monotonic()
    for kv, gone in zip(kvs, on_dead):
        got = tier.get(kv.key)
        if gone:
            assert got is None and tier.get(kv.key, [1]) is None and not tier.contains(kv.key)
            assert directory.holders(kv.key.digest) == []  # a dead shard's directory keys: no holders
        else:
            assert_same_kv(got, kv)
            assert_same_kv(tier.get(kv.key, [1]), kv, layers=[1])
    assert [g is None for g in tier.get_many([kv.key for kv in kvs])] == on_dead
    assert tier.put(kvs[0].key, kvs[0]) is False
    tier.delete(kvs[0].key)
    tier.prefetch([kv.key for kv in kvs])
    tier.stats()
    assert time.monotonic() - start < 20, "calls to a dead shard must fail fast, not wait"
    assert tier.counters().errors >= 1 and tier.counters().corrupt == 0

    cluster.wait_failover(dead)
    deadline = time.monotonic() + 30
    while not all(tier.get(kv.key) is not None for kv in kvs) and time.monotonic() < deadline:
        time.sleep(0.2)  # the tier refreshes its slot map in the background
    for kv in kvs:
        assert_same_kv(tier.get(kv.key), kv)
    assert tier.put(kvs[0].key, kvs[0])
    assert all(directory.holders(kv.key.digest) == [] for kv in kvs)  # no live peer named "a" yet: none listed
    directory.join(b"info-a")
    reader = PeerDirectory(cluster.url, "b", ttl_s=30.0, timeout_s=0.5, prefix=tier.config.prefix)
    assert all(reader.holders(kv.key.digest) == [Holder("a", b"info-a", b"record")] for kv in kvs)
    assert "a" in reader.live_peers()
    directory.leave([kv.key.digest for kv in kvs])
    assert all(reader.holders(kv.key.digest) == [] for kv in kvs)
    reader.leave([])


def test_hung_shard_costs_its_timeout_then_the_failover_serves(private_redis_cluster):
    """A master that stops answering (SIGSTOP) costs a read at most about `redis_timeout_s`, then is skipped; once
    its replica takes over, its entries are hits again."""
    cluster = private_redis_cluster
    tier = cluster_tier(cluster.url, timeout_s=0.5, retry_s=0.5)
    kvs = [random_chunk(seed=200 + i) for i in range(24)]
    for kv in kvs:
        assert tier.put(kv.key, kv)
    cluster.replicate()
    hung = next(node for node in cluster.masters() if cluster.has_replica(node))
    on_hung = [cluster.master_of(tier._name(kv.key)) is hung for kv in kvs]
    assert any(on_hung)
    hung.pause()
    slowest = 0.0
    for kv, gone in zip(kvs, on_hung):
        start = time.monotonic()
        got = tier.get(kv.key)
        slowest = max(slowest, time.monotonic() - start)
        assert (got is None) if gone else (got is not None)
    assert slowest < 5.0, f"a read of a hung shard waited {slowest:.1f}s (timeout 0.5s)"
    cluster.wait_failover(hung)
    deadline = time.monotonic() + 30
    while not all(tier.get(kv.key) is not None for kv in kvs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for kv in kvs:
        assert_same_kv(tier.get(kv.key), kv)
    hung.resume()


def test_a_store_opened_on_a_cluster_url_serves_counts_and_indexes_there(redis_cluster_url):
    from kvblend.rag.config import RedisUnreachable, require_redis
    from kvblend.store import StoreConfig, open_store
    from kvblend.store.anchors import ChunkAnchorIndex

    require_redis(redis_cluster_url)
    with pytest.raises(RedisUnreachable, match=r"redis\+cluster://u:\*\*\*@127.0.0.1:1 is unreachable"):
        require_redis("redis+cluster://u:secret@127.0.0.1:1", timeout_s=0.5)
    kvs = [random_chunk(seed=300 + i) for i in range(4)]
    store = open_store(StoreConfig(redis_url=redis_cluster_url, tier_order=("memory", "redis"),
                                   redis_codec="full"))  # compared bit for bit
    tier = store.tiers[1]
    try:
        for kv in kvs:
            store.put(kv.key, kv)
        store.flush()
        for kv in kvs:
            store.tiers[0].delete(kv.key)
            assert_same_kv(store.get(kv.key), kv)  # from the cluster
        fresh = ChunkAnchorIndex(None, tier)  # another process's view: the chunk index on the cluster
        assert fresh.find(kvs[0].token_ids.tolist(), kvs[0].key.namespace) == [(0, kvs[0].key.num_tokens)]
        totals = store.totals()  # the counter ledger is a hash on the cluster
        assert totals["redis"].hits >= 4 and totals["redis"].entries >= 4
    finally:
        store.close()
        for kv in kvs:
            tier.delete(kv.key)


def test_peers_find_each_other_through_a_directory_on_a_cluster(redis_cluster_url):
    from kvblend.store import PeerConfig, PeerTier

    prefix = f"kvblend-test-{uuid.uuid4().hex[:8]}-"
    holder, reader = (PeerTier(PeerConfig(redis_cluster_url, prefix + name, 1 << 26, timeout_s=10.0, ttl_s=30.0))
                      for name in ("holder", "reader"))
    kvs = [random_chunk(seed=400 + i) for i in range(6)]  # their directory keys are on several shards
    try:
        for kv in kvs:
            assert holder.put(kv.key, kv)
        for kv in kvs:
            assert_same_kv(reader.get(kv.key), kv)
        assert reader.counters().hits == len(kvs) and reader.counters().errors == 0
        holder.close()
        holder = None
        assert all(reader.get(kv.key) is None for kv in kvs)  # the holder left: withdrawn on every shard
    finally:
        for tier in (holder, reader):
            if tier is not None:
                tier.close()
