"""Writers racing readers on the same keys never cost a valid entry: a Redis read that straddles a rewrite (a
layer-sliced read takes several requests) is a plain miss, only an entry bad on its own is deleted, and
`TieredStore.flush` waits for the writes queued before it, not for a queue other threads keep filling."""

import json
import logging
import threading
import time
from functools import partial

import pytest
import torch

import kvblend.store.redis_tier as redis_tier
from kvblend.store import MemoryTier, RedisConfig, RedisTier, TieredStore
from kvblend.store.entry import serialize
from test_store_helpers import assert_same_kv, flip, random_chunk, tensor_span

LOGGER = "kvblend.store.redis_tier"
LAYERS = 8
KEYS = 3  # token seeds of the keys every writer rewrites
SECRET = "race-test-deployment-secret-0001"


@pytest.fixture(params=["server", "cluster"])
def shared(request, redis_prefix):
    """(URL, key prefix) on the session's Redis server, or on its Redis Cluster (whose keys are removed after)."""
    if request.param == "server":
        yield request.getfixturevalue("redis_url"), redis_prefix
        return
    url = request.getfixturevalue("redis_cluster_url")
    yield url, redis_prefix
    tier = RedisTier(RedisConfig(url, prefix=redis_prefix))
    for node in tier._masters():
        for name in node.scan_iter(redis_prefix + "*"):
            node.delete(name)


def version(writer: int, key: int):
    """Writer `writer`'s KV for key `key`: same key (token ids) for every writer, different bytes and base position."""
    return random_chunk(seed=100 * writer + key, token_seed=500 + key, base_position=writer, layers=LAYERS, tokens=64)


def test_sliced_read_straddling_a_rewrite_is_a_miss_and_keeps_the_entry(shared, monkeypatch, caplog):
    redis_url, redis_prefix = shared
    reader = RedisTier(RedisConfig(redis_url, prefix=redis_prefix, timeout_s=5.0))
    writer = RedisTier(RedisConfig(redis_url, prefix=redis_prefix, timeout_s=5.0))
    old, new = version(0, 0), version(1, 0)
    assert writer.put(old.key, old)
    real_read_into = redis_tier._RangeSource.read_into

    def rewrite_between_header_and_layers(source, targets):
        writer.put(new.key, new)  # another host replaces the entry after this reader verified the old header
        return real_read_into(source, targets)

    monkeypatch.setattr(redis_tier._RangeSource, "read_into", rewrite_between_header_and_layers)
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert reader.get(old.key, [2, 5]) is None
    monkeypatch.setattr(redis_tier._RangeSource, "read_into", real_read_into)
    assert reader.counters().corrupt == 0 and "changed while read" in caplog.text
    assert_same_kv(reader.get(new.key, [2, 5]), new, layers=[2, 5])  # still there: the rewrite was not deleted
    assert reader.held_bytes() == len(serialize(new))


def test_stale_read_ahead_of_a_bad_value_does_not_delete_its_valid_rewrite(shared):
    redis_url, redis_prefix = shared
    tier = RedisTier(RedisConfig(redis_url, prefix=redis_prefix, timeout_s=5.0))
    kv, rewrite = version(0, 1), version(1, 1)
    blob = serialize(kv)
    name = tier._name(kv.key)
    tier.client.set(name, flip(blob, tensor_span(blob, "k.3")[0]))  # damaged on the server...
    tier.prefetch([kv.key])  # ...and read ahead in that state
    assert tier.put(rewrite.key, rewrite)  # then rewritten by a healthy writer
    assert tier.get(kv.key) is None  # the stale read-ahead copy fails: a miss
    assert tier.counters().corrupt == 0
    assert_same_kv(tier.get(kv.key), rewrite)


def test_an_entry_bad_on_its_own_is_still_dropped_after_a_sliced_read(redis_url, redis_prefix):
    tier = RedisTier(RedisConfig(redis_url, prefix=redis_prefix, timeout_s=5.0))
    kv = version(0, 2)
    assert tier.put(kv.key, kv)
    blob = serialize(kv)
    tier.client.setrange(tier._name(kv.key), tensor_span(blob, "v.4")[0], b"\xff")
    assert tier.get(kv.key, [4]) is None
    assert tier.counters().corrupt == 1 and not tier.contains(kv.key) and tier.held_bytes() == 0


def run_together(seconds: float, *steps) -> None:
    """Call each `step(n)` for n = 0, 1, ... on a thread of its own until `seconds` have passed; fail with what
    any step raised."""
    end, errors = time.monotonic() + seconds, []

    def loop(step) -> None:
        n = 0
        try:
            while time.monotonic() < end:
                step(n)
                n += 1
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(step,)) for step in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def count_hits(got, versions: dict) -> int:
    """How many of `got`'s (entry, key index, layers) reads hit; each hit must be one writer's version bit for bit."""
    hits = 0
    for kv, k, layers in got:
        if kv is not None:
            assert_same_kv(kv, versions[kv.base_position, k], layers)
            hits += 1
    return hits


def test_writers_and_readers_on_the_same_keys_delete_no_valid_entry(shared, caplog):
    """3 writer threads rewrite 3 keys for 3 s while 2 reader threads read them (layer-sliced, whole, batched,
    read ahead), each through its own tier (as separate hosts would): every hit is one writer's version bit for bit,
    and no reader deletes an entry."""
    redis_url, redis_prefix = shared
    writers = 3
    versions = {(w, k): version(w, k) for w in range(writers) for k in range(KEYS)}
    keys = [versions[0, k].key for k in range(KEYS)]
    tiers = [RedisTier(RedisConfig(redis_url, prefix=redis_prefix, timeout_s=5.0), SECRET) for _ in range(writers + 2)]
    for k in range(KEYS):
        assert tiers[0].put(keys[k], versions[0, k])
    caplog.set_level(logging.INFO, logger=LOGGER)
    writes, hits = [0] * writers, [0, 0]

    def write(w: int, n: int) -> None:
        kv = versions[w, n % KEYS]
        assert tiers[w].put(kv.key, kv)
        writes[w] += 1

    def read(i: int, n: int) -> None:
        tier, k, layers = tiers[writers + i], n % KEYS, [n % LAYERS, (n + 3) % LAYERS]
        got = [(tier.get(keys[k], layers), k, layers), (tier.get(keys[k]), k, None)]
        if n % 4 == 0:
            tier.prefetch(keys)
        got += [(kv, j, None) for j, kv in enumerate(tier.get_many(keys))]
        hits[i] += count_hits(got, versions)

    run_together(3.0, *[partial(write, w) for w in range(writers)], partial(read, 0), partial(read, 1))
    assert [t.counters().corrupt for t in tiers] == [0] * len(tiers)
    assert [t.counters().errors for t in tiers] == [0] * len(tiers)
    assert "dropped bad entry" not in caplog.text
    assert all(tiers[0].contains(key) for key in keys)
    assert sum(hits) > 0
    straddled = sum("changed while read" in r.getMessage() for r in caplog.records)
    print(json.dumps({"writes": writes, "hits": hits, "straddled_reads": straddled}))


class ChainTier(MemoryTier):
    """A background tier whose every write queues another write of the same entry: the store's write queue is
    never empty, as under a steady stream of puts from other threads."""

    synchronous = False
    secret = None

    def __init__(self) -> None:
        super().__init__(1 << 30)
        self.store: TieredStore | None = None
        self.stop = threading.Event()
        self.written: list[str] = []

    def put_bytes(self, key, blob) -> bool:
        self.written.append(key.digest)
        if not self.stop.is_set():
            self.store.put(self.chain.key, self.chain)
        return True


def test_flush_waits_only_for_the_writes_queued_before_it():
    chain_tier = ChainTier()
    chain_tier.chain = random_chunk(seed=1)
    store = TieredStore([MemoryTier(1 << 30), chain_tier], write_queue=8)
    chain_tier.store = store
    mine = random_chunk(seed=2)
    try:
        store.put(chain_tier.chain.key, chain_tier.chain)  # starts the endless stream
        store.put(mine.key, mine)
        flusher = threading.Thread(target=store.flush)
        flusher.start()
        flusher.join(timeout=30)  # a bound on a hang, not a timing: the queue never empties
        assert not flusher.is_alive(), "flush waited for writes queued after it"
        assert mine.key.digest in chain_tier.written
        assert torch.equal(store.get(mine.key).k, mine.k)
    finally:
        chain_tier.stop.set()
        store.close()



def test_peer_reads_racing_rewrites_of_the_same_key_find_no_bad_entry(redis_url, redis_prefix):
    """One instance re-exports versions of the keys for 2 s while another reads them over NIXL and the writer reads
    its own exports: every hit is a whole version, no peer is distrusted, no export withdrawn as bad."""
    from kvblend.store import PeerConfig, PeerTier

    def peer(instance: str) -> PeerTier:
        return PeerTier(PeerConfig(redis_url, f"{redis_prefix}{instance}", 1 << 26,
                                   timeout_s=10.0, ttl_s=30.0))

    writer, reader = peer("writer"), peer("reader")
    versions = {(w, k): version(w, k) for w in range(2) for k in range(KEYS)}
    keys = [versions[0, k].key for k in range(KEYS)]
    hits = [0, 0]

    def write(n: int) -> None:
        assert writer.put(keys[n % KEYS], versions[(n // KEYS) % 2, n % KEYS])

    def read(tier: PeerTier, i: int, n: int) -> None:
        k, layers = n % KEYS, [n % LAYERS]
        hits[i] += count_hits([(tier.get(keys[k]), k, None), (tier.get(keys[k], layers), k, layers)], versions)

    try:
        run_together(2.0, write, partial(read, reader, 0), partial(read, writer, 1))
        assert [t.counters().corrupt for t in (writer, reader)] == [0, 0]
        assert reader.counters().errors == 0 and all(hits)
    finally:
        writer.close()
        reader.close()
