"""The peer tier between processes: a second process stores chunks, this one reads them over NIXL (UCX over
TCP loopback) through the Redis directory, bit for bit; a hung peer costs its timeout, a killed one its
timeout then falls back to Redis's copy, and the directory forgets it once its heartbeat TTL runs out."""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from test_store_helpers import assert_same_kv, flip, python_env, random_chunk, tensor_span

from kvblend.store import PeerConfig, PeerTier, RedisConfig, RedisTier, StoreConfig, open_store
from kvblend.store.entry import serialize

SHAPE = {"layers": 6, "tokens": 64, "heads": 3, "head_dim": 64}
SECRET = "peer-test-deployment-secret-0123"

PEER = """
import json, sys
from kvblend.store import StoreConfig, open_store
from test_store_helpers import random_chunk
url, instance, ttl, seeds, shape, secret = sys.argv[1], sys.argv[2], float(sys.argv[3]), *map(json.loads, sys.argv[4:7])
config = StoreConfig(memory_bytes=1 << 28, directory_url=url, peer_instance=instance, peer_ttl_s=ttl,
                     tier_order=("memory", "peer"), secret=secret, peer_codec="full")  # bit-exact transport
store = open_store(config)
for seed in seeds:
    kv = random_chunk(seed=seed, **shape)
    store.put(kv.key, kv)
store.flush()
print("ready", flush=True)
sys.stdin.readline()
store.close()
"""


def _start_peer(url: str, instance: str, seeds: list[int], ttl_s: float = 10.0, secret: str | None = None):
    """A second process holding `seeds`' chunks in its store (exported to peers); it exits on a line on stdin."""
    args = [url, instance, str(ttl_s), json.dumps(seeds), json.dumps(SHAPE), json.dumps(secret)]
    with tempfile.TemporaryFile() as log:  # the child keeps its own descriptor of it
        peer = subprocess.Popen([sys.executable, "-c", PEER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True, env=python_env())
        said = []
        for line in peer.stdout:  # NIXL logs to stdout too
            if line.strip() == "ready":
                return peer
            said.append(line)
        peer.wait()
        log.seek(0)
        raise AssertionError(f"peer did not start: {''.join(said)[-2000:]}{log.read()[-3000:].decode(errors='replace')}")


def _stop(peer) -> None:
    """Let the peer leave the directory and exit; kill it if it does not."""
    if peer.poll() is None:
        os.kill(peer.pid, signal.SIGCONT)
        try:
            peer.communicate("\n", timeout=30)
        except subprocess.TimeoutExpired:
            peer.kill()
    peer.wait(timeout=30)


def _reader(url: str, **options) -> StoreConfig:
    """This process's store; reads that must succeed get a timeout a loaded 2-core machine cannot miss."""
    options.setdefault("peer_timeout_s", 10.0)
    options.update(peer_codec="full", redis_codec="full")  # the tests compare entries bit for bit
    return StoreConfig(memory_bytes=1 << 28, directory_url=url, peer_instance="reader", **options)


def test_chunk_fetched_from_a_peer_process_is_bit_identical(private_redis):
    peer = _start_peer(private_redis.url, "peer-a", [41, 42])
    try:
        with open_store(_reader(private_redis.url, tier_order=("memory", "peer"))) as store:
            sliced = random_chunk(seed=42, **SHAPE)
            assert_same_kv(store.get(sliced.key, [4, 1]), sliced, layers=[4, 1])  # a layer slice, from the peer
            for seed in (41, 42):
                want = random_chunk(seed=seed, **SHAPE)
                assert_same_kv(store.get(want.key), want)
            assert store.get(random_chunk(seed=43, **SHAPE).key) is None  # nobody holds it
            assert store.hits() == {"memory": 0, "peer": 3}
            want = random_chunk(seed=41, **SHAPE)
            assert_same_kv(store.get(want.key), want)  # promoted into memory by the whole-entry read
            assert store.hits()["memory"] == 1
    finally:
        _stop(peer)


def test_peers_with_a_secret_accept_each_other_and_refuse_an_unkeyed_reader(private_redis, caplog):
    peer = _start_peer(private_redis.url, "peer-s", [51], secret=SECRET)
    want = random_chunk(seed=51, **SHAPE)
    try:
        with open_store(_reader(private_redis.url, tier_order=("memory", "peer"), secret=SECRET)) as store:
            assert_same_kv(store.get(want.key), want)
        caplog.set_level(logging.WARNING, logger="kvblend.store.peer")
        with open_store(_reader(private_redis.url, tier_order=("memory", "peer"), secret=None)) as store:
            assert store.get(want.key) is None  # a MAC'd entry is refused without the secret, not returned
            assert store.stats()["peer"].corrupt == 1
        assert any("refusing entry" in r.getMessage() for r in caplog.records)
    finally:
        _stop(peer)


def test_hung_peer_costs_its_timeout_then_the_next_tier(private_redis):
    peer = _start_peer(private_redis.url, "peer-h", [61])
    want = random_chunk(seed=61, **SHAPE)
    RedisTier(RedisConfig(private_redis.url)).put(want.key, want)
    try:
        os.kill(peer.pid, signal.SIGSTOP)  # alive to the directory until its TTL runs out, but answers nothing
        with open_store(_reader(private_redis.url, redis_url=private_redis.url, peer_timeout_s=0.5)) as store:
            start = time.monotonic()
            assert_same_kv(store.get(want.key), want)
            assert time.monotonic() - start < 3.0
            assert store.hits()["redis"] == 1 and store.stats()["peer"].errors == 1
    finally:
        _stop(peer)


def test_killed_peer_falls_back_and_the_directory_forgets_it(private_redis):
    ttl_s = 3.0  # heartbeats every second: a loaded machine still keeps the live peer listed
    peer = _start_peer(private_redis.url, "peer-k", [71, 72, 73], ttl_s=ttl_s)
    first, second, third = (random_chunk(seed=s, **SHAPE) for s in (71, 72, 73))
    RedisTier(RedisConfig(private_redis.url)).put(second.key, second)
    with open_store(_reader(private_redis.url, redis_url=private_redis.url, peer_timeout_s=5.0)) as store:
        peer_tier = store.tiers[1]
        assert peer_tier.name == "peer" and "peer-k" in peer_tier.directory.live_peers()
        assert_same_kv(store.get(first.key), first)
        assert store.hits()["peer"] == 1

        peer.kill()  # mid-run: the directory still names it as holder of the other two chunks
        peer.wait(timeout=30)
        peer.stdout.close()
        start = time.monotonic()
        assert_same_kv(store.get(second.key), second)  # the peer fails within its timeout; Redis's copy serves
        assert time.monotonic() - start < 8.0
        assert store.hits()["redis"] == 1 and peer_tier.stats().errors == 1

        deadline = time.monotonic() + 10 * ttl_s
        while "peer-k" in peer_tier.directory.live_peers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "peer-k" not in peer_tier.directory.live_peers()
        assert peer_tier.directory.holders(third.key.digest) == []  # the lookup drops the dead holder
        holders = private_redis.client().hgetall(f"kvblend:holders:{third.key.digest}")
        assert b"peer-k" not in holders
        assert store.get(third.key) is None  # nobody else has it: the caller recomputes


def test_entry_damaged_at_the_peer_is_refused_after_transfer_and_the_next_holder_serves(private_redis, caplog):
    kv = random_chunk(seed=91, **SHAPE)
    blob = serialize(kv)
    start, _ = tensor_span(blob, "v.3")

    def tier(instance: str) -> PeerTier:
        return PeerTier(PeerConfig(private_redis.url, instance, 1 << 26, timeout_s=2.0, ttl_s=10.0))

    liar, honest, reader = tier("a-liar"), tier("b-honest"), tier("reader")
    try:
        assert liar.put_bytes(kv.key, flip(blob, start + 5))  # one bit of layer 3's V, at the holder
        caplog.set_level(logging.WARNING, logger="kvblend.store.peer")
        assert reader.get(kv.key) is None  # moved over NIXL, then refused: never returned
        assert reader.stats().corrupt == 1
        assert any("bad entry" in r.getMessage() and "a-liar" in r.getMessage() for r in caplog.records)
        assert honest.put(kv.key, kv)
        assert_same_kv(reader.get(kv.key), kv)  # the liar is skipped for retry_s, the honest one serves
        assert reader.stats().corrupt == 1 and reader.stats().hits == 1
    finally:
        for t in (liar, honest, reader):
            t.close()


def test_peer_get_many_reads_each_key_and_a_store_with_peers_warms(private_redis):
    """The peer tier's batched read (one bounded read per key) serves each key its entry and misses the rest;
    `warm` on a store with a peer tier touches only the disk (the peer tier has nothing to warm)."""
    held = [random_chunk(seed=111 + s, **SHAPE) for s in range(2)]
    missing = random_chunk(seed=119, **SHAPE)

    def tier(instance: str) -> PeerTier:
        return PeerTier(PeerConfig(private_redis.url, instance, 1 << 26, timeout_s=2.0, ttl_s=10.0))

    holder, reader = tier("holder"), tier("reader")
    try:
        for kv in held:
            assert holder.put(kv.key, kv)
        got = reader.get_many([held[1].key, missing.key, held[0].key], held[0].layout)
        assert got[1] is None
        assert_same_kv(got[0], held[1])
        assert_same_kv(got[2], held[0])
        assert reader.counters().hits == 2 and reader.counters().misses == 1
    finally:
        for t in (holder, reader):
            t.close()
    with tempfile.TemporaryDirectory() as disk_dir:
        config = _reader(private_redis.url, disk_dir=disk_dir, tier_order=("memory", "disk", "peer"))
        with open_store(config) as store:
            store.warm([kv.key for kv in held])  # no error, and nothing decoded or read
            assert all(t.counters().hits == 0 for t in store.tiers)


def test_peer_restarted_under_the_same_name_is_read_at_once(private_redis):
    old, new = random_chunk(seed=101, **SHAPE), random_chunk(seed=102, **SHAPE)
    with open_store(_reader(private_redis.url, tier_order=("memory", "peer"))) as store:
        peer = _start_peer(private_redis.url, "peer-r", [101])
        try:
            assert_same_kv(store.get(old.key), old)
        finally:
            _stop(peer)
        peer = _start_peer(private_redis.url, "peer-r", [102])  # a new agent, new connection info, same name
        try:
            assert_same_kv(store.get(new.key), new)
            assert store.stats()["peer"].errors == 0
        finally:
            _stop(peer)


def test_directory_outage_gives_misses_never_errors(private_redis):
    kv = random_chunk(seed=81, **SHAPE)
    with open_store(_reader(private_redis.url, tier_order=("memory", "peer"), peer_timeout_s=0.5)) as store:
        peer_tier = store.tiers[1]
        private_redis.stop()
        start = time.monotonic()
        assert peer_tier.get(kv.key) is None and not peer_tier.contains(kv.key)
        assert peer_tier.put(kv.key, kv)  # exported; the announcement is lost with the directory
        assert peer_tier.directory.live_peers() == []
        assert time.monotonic() - start < 5.0
        assert_same_kv(peer_tier.get(kv.key), kv)  # its own export still serves it


def test_store_config_rejects_a_configured_tier_missing_from_the_order():
    with pytest.raises(ValueError, match="missing from tier_order"):
        StoreConfig(directory_url="redis://127.0.0.1:1/0", tier_order=("memory", "disk", "redis"))
    with pytest.raises(ValueError, match="distinct tiers"):
        StoreConfig(tier_order=("memory", "memory"))
    with pytest.raises(ValueError, match="distinct tiers"):
        StoreConfig(tier_order=("disk", "tape"))
    with pytest.raises(ValueError, match="peer_timeout_s"):
        StoreConfig(peer_timeout_s=0)
