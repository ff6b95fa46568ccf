"""TieredStore over real tiers: promotion on hits, write-through after flush(), asynchronous prefetch into
memory, batched reads (`get_many`), and a dead or hung Redis that costs neither the memory and disk copies nor
the caller's time."""

import time

import pytest

from kvblend.store import DiskTier, MemoryTier, RedisConfig, RedisTier, StoreConfig, TieredStore, open_store
from kvblend.store.entry import serialize
from test_store_helpers import assert_same_kv, random_chunk


def _tiers(tmp_path, redis_url=None, prefix="", timeout_s=2.0, retry_s=5.0):
    tiers = [MemoryTier(1 << 30), DiskTier(tmp_path / "kv", 1 << 30)]
    if redis_url:
        tiers.append(RedisTier(RedisConfig(redis_url, prefix=prefix, timeout_s=timeout_s, retry_s=retry_s)))
    return tiers


def test_disk_hit_is_promoted_to_memory(tmp_path):
    kv = random_chunk(seed=1)
    with TieredStore(_tiers(tmp_path)) as writer:
        writer.put(kv.key, kv)
    memory, disk = _tiers(tmp_path)  # a fresh process: empty memory, the same directory
    with TieredStore([memory, disk]) as store:
        assert not memory.contains(kv.key) and disk.contains(kv.key)
        assert_same_kv(store.get(kv.key), kv)
        assert memory.contains(kv.key)
        assert_same_kv(store.get(kv.key), kv)
        assert_same_kv(store.get(kv.key, [2, 1]), kv, layers=[2, 1])
        assert disk.stats().hits == 1 and memory.stats().hits == 2


def test_write_through_reaches_disk_and_redis_after_flush(tmp_path, redis_url, redis_prefix):
    memory, disk, redis_tier = tiers = _tiers(tmp_path, redis_url, redis_prefix)
    chunks = [random_chunk(seed=s, base_position=s) for s in range(6)]
    with TieredStore(tiers, write_queue=2) as store:  # a small queue: put waits, never drops
        for kv in chunks:
            store.put(kv.key, kv)
            assert memory.contains(kv.key)  # memory is written on the caller's thread
        store.flush()
        for kv in chunks:
            assert_same_kv(disk.get(kv.key), kv)
            assert_same_kv(redis_tier.get(kv.key), kv)
        assert disk.stats().entries == redis_tier.stats().entries == 6
        store.delete(chunks[0].key)
        assert not any(t.contains(chunks[0].key) for t in tiers) and not store.contains(chunks[0].key)
        assert store.get(chunks[0].key) is None
        with pytest.raises(ValueError):
            store.put(chunks[1].key, chunks[2])  # an entry under another chunk's key


def test_close_flushes_pending_writes(tmp_path):
    chunks = [random_chunk(seed=s) for s in range(4)]
    store = TieredStore(_tiers(tmp_path))
    for kv in chunks:
        store.put(kv.key, kv)
    store.close()
    disk = DiskTier(tmp_path / "kv", 1 << 30)
    for kv in chunks:
        assert_same_kv(disk.get(kv.key), kv)


def test_redis_hit_is_promoted_to_memory_and_disk(tmp_path, redis_url, redis_prefix):
    memory, disk, redis_tier = tiers = _tiers(tmp_path, redis_url, redis_prefix)
    kv = random_chunk(seed=2)
    redis_tier.put(kv.key, kv)  # written by another host
    with TieredStore(tiers) as store:
        assert_same_kv(store.get(kv.key), kv)
        assert memory.contains(kv.key)
        store.flush()
        assert_same_kv(disk.get(kv.key), kv)


def _damaged(kv) -> bytes:
    """The entry's bytes with one byte of its last layer's values flipped (a digest mismatch)."""
    blob = bytearray(serialize(kv))
    blob[-5] ^= 0x40
    return bytes(blob)


def test_get_many_serves_each_key_its_own_entry_and_rejects_damaged_ones(tmp_path, redis_url, redis_prefix):
    import redis

    chunks = [random_chunk(seed=40 + s, base_position=128 * s) for s in range(6)]
    with TieredStore(_tiers(tmp_path, redis_url, redis_prefix)) as writer:
        for kv in chunks[:5]:  # chunk 5 is stored nowhere
            writer.put(kv.key, kv)
    memory, disk, redis_tier = tiers = _tiers(tmp_path, redis_url, redis_prefix)
    memory.put(chunks[0].key, chunks[0])
    disk.path(chunks[2].key).write_bytes(_damaged(chunks[2]))  # damaged on disk: Redis's copy serves it
    disk.delete(chunks[3].key)  # only in Redis
    disk.path(chunks[4].key).write_bytes(_damaged(chunks[4]))  # damaged on disk and in Redis: a miss
    redis.Redis.from_url(redis_url).set(redis_prefix + chunks[4].key.digest, _damaged(chunks[4]))
    keys = [kv.key for kv in reversed(chunks)]  # not the order they were stored in
    with TieredStore(tiers) as store:
        got = store.get_many(keys, chunks[0].layout)
        assert got[0] is None and got[1] is None
        for kv, want in zip(got[2:], reversed(chunks[:4])):
            assert_same_kv(kv, want)
        assert memory.stats().hits == 1 and disk.stats().hits == 1 and redis_tier.stats().hits == 2
        assert disk.stats().corrupt == 2 and redis_tier.stats().corrupt == 1
        assert all(memory.contains(kv.key) for kv in chunks[:4]) and not memory.contains(chunks[4].key)
        store.flush()
        assert_same_kv(disk.get(chunks[3].key), chunks[3])  # Redis hits are promoted to disk as well
        assert store.get_many([chunks[1].key], chunks[1].layout)[0] is not None
        assert store.get_many([chunks[1].key], random_chunk(seed=0, layers=2).layout) == [None]  # another model


def test_prefetch_loads_disk_and_redis_entries_into_memory(tmp_path, redis_url, redis_prefix):
    memory, disk, redis_tier = tiers = _tiers(tmp_path, redis_url, redis_prefix)
    on_disk = [random_chunk(seed=s) for s in range(3)]
    in_redis = [random_chunk(seed=s) for s in range(3, 5)]
    absent = random_chunk(seed=9)
    for kv in on_disk:
        disk.put(kv.key, kv)
    for kv in in_redis:
        redis_tier.put(kv.key, kv)
    with TieredStore(tiers) as store:
        future = store.prefetch([kv.key for kv in on_disk + in_redis] + [absent.key])
        assert future.result(timeout=30) == 5
        for kv in on_disk + in_redis:
            assert memory.contains(kv.key)
            assert_same_kv(memory.get(kv.key), kv)
        assert not memory.contains(absent.key)
        assert store.prefetch([on_disk[0].key]).result(timeout=30) == 1  # already resident


def test_prefetch_does_not_wait_on_a_hung_redis(tmp_path, private_redis):
    memory, disk, redis_tier = tiers = _tiers(tmp_path, private_redis.url, timeout_s=0.5, retry_s=0.0)
    kv = random_chunk(seed=3)
    redis_tier.put(kv.key, kv)
    with TieredStore(tiers) as store:
        private_redis.pause()
        try:
            start = time.monotonic()
            future = store.prefetch([kv.key])
            returned = time.monotonic() - start
            assert returned < 0.2, f"prefetch held the caller for {returned:.2f}s"
            assert future.result(timeout=30) == 0  # the hung server gave misses, in the background
        finally:
            private_redis.resume()
        time.sleep(0.05)
        assert store.prefetch([kv.key]).result(timeout=30) == 1
        assert memory.contains(kv.key)


def test_dead_redis_keeps_memory_and_disk_copies(tmp_path, private_redis):
    memory, disk, redis_tier = tiers = _tiers(tmp_path, private_redis.url, timeout_s=0.5, retry_s=0.1)
    chunks = [random_chunk(seed=s) for s in range(3)]
    private_redis.stop()
    with TieredStore(tiers) as store:
        start = time.monotonic()
        for kv in chunks:
            store.put(kv.key, kv)
        store.flush()
        assert time.monotonic() - start < 5
        for kv in chunks:
            assert_same_kv(store.get(kv.key), kv)
            assert_same_kv(disk.get(kv.key), kv)
        assert not redis_tier.contains(chunks[0].key)
        memory.delete(chunks[0].key)
        assert_same_kv(store.get(chunks[0].key), chunks[0])  # from disk, with Redis still down
        missing = random_chunk(seed=8)
        assert store.get(missing.key) is None and store.get(missing.key, [0]) is None
        assert not store.contains(missing.key)
        assert store.prefetch([missing.key]).result(timeout=30) == 0
        memory.delete(chunks[2].key)
        got = store.get_many([missing.key, chunks[2].key])  # one MGET to a dead server: misses, no error
        assert got[0] is None and got[1] is not None
        assert_same_kv(got[1], chunks[2])
        private_redis.start()
        time.sleep(0.15)
        store.put(chunks[1].key, chunks[1])
        store.flush()
        assert_same_kv(redis_tier.get(chunks[1].key), chunks[1])  # back in service


def test_open_store_builds_the_configured_tiers(tmp_path, private_redis):
    config = StoreConfig(memory_bytes=1 << 20, disk_dir=str(tmp_path / "kv"), disk_bytes=1 << 22,
                         redis_url=private_redis.url, redis_timeout_s=0.5)
    kv = random_chunk(seed=5)
    with open_store(config) as store:
        assert [t.name for t in store.tiers] == ["memory", "disk", "redis"]
        store.put(kv.key, kv)
        store.flush()
        assert all(t.contains(kv.key) for t in store.tiers)
        stats = store.stats()
        assert stats["memory"].entries == stats["disk"].entries == stats["redis"].entries == 1
    with pytest.raises(ValueError):
        StoreConfig(memory_bytes=0)
    with pytest.raises(ValueError):
        StoreConfig(redis_url="localhost:6379")
