"""Prefetch at retrieval time on real tiers: a read of a key being prefetched waits for that load instead of
reading the slow tier again, and `warm` (what a RAGPipeline does beside its engine) only touches caches every
process of the host shares."""

from kvblend.store import DiskTier, MemoryTier, RedisConfig, RedisTier, TieredStore
from test_store_helpers import assert_same_kv, random_chunk


def _commands(client) -> dict:
    return {name: int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def test_layer_reads_during_a_prefetch_are_served_by_it(private_redis):
    redis = RedisTier(RedisConfig(private_redis.url, timeout_s=2.0))
    chunks = [random_chunk(seed=s) for s in range(3)]
    for kv in chunks:
        redis.put(kv.key, kv)
    client = private_redis.client()
    with TieredStore([MemoryTier(1 << 30), redis]) as store:
        store.prefetch([kv.key for kv in chunks])
        for layer in range(chunks[0].k.shape[0]):  # what the blend's layer source does, right after scheduling
            for kv in chunks:
                assert_same_kv(store.get(kv.key, layers=(layer,)), kv, layers=[layer])
        assert redis.counters().hits == 3  # one read per entry: the prefetch's MGET
        commands = _commands(client)
        assert commands.get("cmdstat_mget") == 1 and "cmdstat_getrange" not in commands
        assert store.tiers[0].counters().hits == 3 * chunks[0].k.shape[0]


def test_without_prefetch_layer_reads_go_to_the_slow_tier(private_redis):
    redis = RedisTier(RedisConfig(private_redis.url, timeout_s=2.0))
    kv = random_chunk(seed=1)
    redis.put(kv.key, kv)
    with TieredStore([MemoryTier(1 << 30), redis]) as store:
        for layer in range(kv.k.shape[0]):
            assert store.get(kv.key, layers=(layer,)) is not None
    assert redis.counters().hits == kv.k.shape[0]  # the control for the test above: one read per layer


def test_warm_touches_only_host_shared_tiers(tmp_path, private_redis):
    disk = DiskTier(tmp_path / "kv", 1 << 30)
    redis = RedisTier(RedisConfig(private_redis.url, timeout_s=2.0))
    kv = random_chunk(seed=2)
    disk.put(kv.key, kv)
    redis.put(kv.key, kv)
    client = private_redis.client()
    with TieredStore([MemoryTier(1 << 30), disk, redis]) as store:
        store.warm([kv.key, random_chunk(seed=3).key])  # an absent key is no error
        assert not store.tiers[0].contains(kv.key)  # nothing decoded into this process's memory
        assert "cmdstat_mget" not in _commands(client)  # nor pulled into its Redis read-ahead
        assert disk.counters().hits == 0
        assert_same_kv(store.get(kv.key), kv)
