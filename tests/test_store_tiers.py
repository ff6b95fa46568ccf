"""Memory, disk and Redis tiers on real memory, real files and a real redis-server: round trips, layer-sliced
reads, LRU budgets, and damaged entries that must be detected, removed, logged and never returned."""

import logging
import os
import time

import pytest
import torch

from kvblend.store import DiskTier, MemoryTier, RedisConfig, RedisTier
from kvblend.store.entry import KVLayout, serialize
from kvblend.store.key import ChunkKey
from test_store_helpers import (
    assert_same_kv,
    flip_file_byte,
    random_chunk,
    retag_metadata,
    retag_tensor_dtype,
    split_entry,
    tensor_span,
)

DTYPES = [torch.bfloat16, torch.float32]


def make_tier(kind: str, tmp_path, redis_url: str, prefix: str, **kw):
    if kind == "memory":
        return MemoryTier(kw.get("max_bytes", 1 << 30))
    if kind == "disk":
        return DiskTier(tmp_path / "kv", kw.get("max_bytes", 1 << 30))
    return RedisTier(RedisConfig(redis_url, prefix=prefix, timeout_s=2.0))


@pytest.fixture(params=["memory", "disk", "redis"])
def tier(request, tmp_path):
    if request.param == "redis":
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        return make_tier("redis", tmp_path, url, prefix)
    return make_tier(request.param, tmp_path, "", "")


class DiskRaw:
    """Direct access to a disk tier's stored bytes, to damage them."""

    def __init__(self, tier: DiskTier) -> None:
        self.tier = tier

    def read(self, key: ChunkKey) -> bytes:
        return self.tier.path(key).read_bytes()

    def write(self, key: ChunkKey, blob: bytes) -> None:
        self.tier.path(key).parent.mkdir(exist_ok=True)
        self.tier.path(key).write_bytes(blob)

    def flip(self, key: ChunkKey, offset: int) -> None:
        flip_file_byte(self.tier.path(key), offset)

    def truncate(self, key: ChunkKey, length: int) -> None:
        os.truncate(self.tier.path(key), length)

    def exists(self, key: ChunkKey) -> bool:
        return self.tier.path(key).exists()


class RedisRaw:
    """Direct access to a Redis tier's stored values (GETRANGE/SETRANGE on the server)."""

    def __init__(self, tier: RedisTier) -> None:
        import redis

        self.tier = tier
        self.client = redis.Redis.from_url(tier.config.url, socket_timeout=5)

    def name(self, key: ChunkKey) -> str:
        return self.tier.config.prefix + key.digest

    def read(self, key: ChunkKey) -> bytes:
        return self.client.get(self.name(key))

    def write(self, key: ChunkKey, blob: bytes) -> None:
        self.client.set(self.name(key), blob)

    def flip(self, key: ChunkKey, offset: int) -> None:
        (byte,) = self.client.getrange(self.name(key), offset, offset)
        self.client.setrange(self.name(key), offset, bytes([byte ^ 0x01]))

    def truncate(self, key: ChunkKey, length: int) -> None:
        self.client.set(self.name(key), self.read(key)[:length])

    def exists(self, key: ChunkKey) -> bool:
        return bool(self.client.exists(self.name(key)))


@pytest.fixture(params=["disk", "redis"])
def stored(request, tmp_path):
    """(tier, raw access) for the tiers that keep serialised bytes."""
    if request.param == "disk":
        tier = make_tier("disk", tmp_path, "", "")
        return tier, DiskRaw(tier)
    tier = make_tier("redis", tmp_path, request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"))
    return tier, RedisRaw(tier)


# --- round trips and the tier interface ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(tier, dtype):
    chunks = [random_chunk(seed=s, dtype=dtype, base_position=s) for s in range(3)]
    for kv in chunks:
        assert tier.put(kv.key, kv) is True
    for kv in chunks:
        assert tier.contains(kv.key)
        assert_same_kv(tier.get(kv.key), kv)
    stats = tier.stats()
    assert stats.puts == 3 and stats.hits == 3 and stats.entries == 3 and stats.corrupt == 0


def test_get_many_serves_each_key_its_entry_and_misses_the_rest(tier):
    """The batched read every tier implements (memory: its entries; disk: entries on threads; Redis: one MGET)."""
    chunks = [random_chunk(seed=30 + s, base_position=s) for s in range(3)]
    for kv in chunks:
        assert tier.put(kv.key, kv)
    order = [chunks[2], None, chunks[0], chunks[1]]
    keys = [kv.key if kv is not None else random_chunk(seed=39).key for kv in order]
    got = tier.get_many(keys, chunks[0].layout)
    for want, out in zip(order, got):
        if want is None:
            assert out is None
        else:
            assert_same_kv(out, want)
    counts = tier.counters()
    assert counts.hits == 3 and counts.misses == 1 and counts.corrupt == 0
    assert tier.get_many([], chunks[0].layout) == []


def test_entry_read_back_serialises_to_the_same_bytes(tmp_path):
    """A read entry's K and V are views into one [layers, 2, ...] buffer (not contiguous along the layers);
    storing it again (a promotion into a slower tier) writes exactly the bytes first written."""
    tier = DiskTier(tmp_path / "kv", 1 << 30)
    kv = random_chunk(seed=70, dtype=torch.float32)
    tier.put(kv.key, kv)
    back = tier.get(kv.key, None, kv.layout)
    assert not back.k.is_contiguous() and all(back.k[i].is_contiguous() for i in range(len(back.k)))
    assert serialize(back) == serialize(kv) == tier.path(kv.key).read_bytes()


def test_miss_contains_delete_and_prefetch(tier):
    kv, absent = random_chunk(seed=1), random_chunk(seed=2)
    assert tier.get(absent.key) is None and not tier.contains(absent.key)
    tier.put(kv.key, kv)
    tier.prefetch([kv.key, absent.key])
    assert_same_kv(tier.get(kv.key), kv)
    tier.delete(kv.key)
    tier.delete(absent.key)  # deleting what is not there is fine
    assert not tier.contains(kv.key) and tier.get(kv.key) is None
    stats = tier.stats()
    assert stats.misses == 2 and stats.hits == 1 and stats.entries == 0


def test_overwrite_keeps_one_entry(tier):
    first = random_chunk(seed=1)
    second = random_chunk(seed=2, token_seed=1, base_position=4)  # same key, other KV
    assert first.key == second.key
    tier.put(first.key, first)
    tier.put(second.key, second)
    assert_same_kv(tier.get(first.key), second)
    assert tier.stats().entries == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers", [[0], [3], [2, 0], [1, 2, 3]])
def test_layer_sliced_read_returns_exactly_those_layers(tier, dtype, layers):
    kv = random_chunk(seed=5, dtype=dtype, base_position=2)
    tier.put(kv.key, kv)
    assert_same_kv(tier.get(kv.key, layers), kv, layers=layers)
    assert_same_kv(tier.get(kv.key), kv)  # the whole entry is still there and intact


def test_layer_request_out_of_range_raises_or_misses_and_keeps_the_entry(tier):
    kv = random_chunk(seed=6)
    tier.put(kv.key, kv)
    for layers in ([-1], []):
        with pytest.raises(ValueError):
            tier.get(kv.key, layers)
    with pytest.raises(ValueError):  # beyond the model's layers: the caller's mistake
        tier.get(kv.key, [4], kv.layout)
    assert tier.get(kv.key, [4]) is None  # beyond the entry's layers, model unknown: a miss (could be a short forgery)
    assert_same_kv(tier.get(kv.key), kv)


@pytest.mark.parametrize("sliced", [False, True])
def test_entry_of_another_layout_is_a_dropped_miss_for_the_model(tier, sliced):
    kv = random_chunk(seed=7, heads=2)
    for other in (KVLayout(5, 2, 64, "bfloat16"), KVLayout(4, 3, 64, "bfloat16"), KVLayout(4, 2, 64, "float32")):
        tier.put(kv.key, kv)
        assert_same_kv(tier.get(kv.key, None, kv.layout), kv)
        assert tier.get(kv.key, [0] if sliced else None, other) is None
        assert not tier.contains(kv.key)  # its fingerprint names the model, whose layout it contradicts
    assert tier.stats().corrupt == 3


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_disk_sliced_read_reads_only_those_ranges(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    kv = random_chunk(seed=7, dtype=torch.float32, layers=16, tokens=128, heads=4)  # 4 MiB, 256 KiB a layer
    tier.put(kv.key, kv)
    blob = tier.path(kv.key).read_bytes()
    wanted = _rchar()
    got = tier.get(kv.key, [9])
    read = _rchar() - wanted
    assert_same_kv(got, kv, layers=[9])
    start, end = tensor_span(blob, "k.9")
    assert read < 3 * (end - start) + split_entry(blob)[2] + 4096, f"read {read} of {len(blob)} bytes"
    # Damage a layer that was not asked for: the sliced read never touches it; a whole read does.
    flip_file_byte(tier.path(kv.key), tensor_span(blob, "v.4")[0] + 5)
    assert_same_kv(tier.get(kv.key, [9, 0]), kv, layers=[9, 0])
    assert tier.get(kv.key) is None and not tier.path(kv.key).exists()


def test_redis_sliced_read_uses_getrange_on_a_few_ranges(private_redis):
    tier = RedisTier(RedisConfig(private_redis.url, timeout_s=2.0))
    client = private_redis.client()
    kv = random_chunk(seed=8, dtype=torch.float32, layers=16, tokens=128, heads=4)
    tier.put(kv.key, kv)
    blob = serialize(kv)
    client.config_resetstat()
    sent_before = client.info("stats")["total_net_output_bytes"]
    got = tier.get(kv.key, [3])
    sent = client.info("stats")["total_net_output_bytes"] - sent_before
    assert_same_kv(got, kv, layers=[3])
    commands = client.info("commandstats")
    assert commands["cmdstat_getrange"]["calls"] >= 3  # header length, header, token ids + K + V
    assert "cmdstat_get" not in commands and "cmdstat_mget" not in commands
    start, end = tensor_span(blob, "k.3")
    assert sent < 3 * (end - start) + split_entry(blob)[2] + 4096, f"server sent {sent} of {len(blob)} bytes"
    # Damage an unrequested layer on the server: the sliced read still succeeds, the whole read refuses it.
    RedisRaw(tier).flip(kv.key, tensor_span(blob, "k.12")[0])
    assert_same_kv(tier.get(kv.key, [3, 15]), kv, layers=[3, 15])
    assert tier.get(kv.key) is None and not client.exists(tier.config.prefix + kv.key.digest)


# --- LRU budgets ---------------------------------------------------------------------------------------


def test_memory_lru_honours_its_budget():
    a, b, c, d = (random_chunk(seed=s) for s in range(4))
    tier = MemoryTier(max_bytes=3 * a.nbytes + a.nbytes // 2)
    for kv in (a, b, c):
        assert tier.put(kv.key, kv)
    assert tier.get(a.key) is not None  # a is now the most recently used
    tier.prefetch([b.key])  # ... then b
    assert tier.put(d.key, d)
    assert [tier.contains(kv.key) for kv in (a, b, c, d)] == [True, True, False, True]
    stats = tier.stats()
    assert stats.evictions == 1 and stats.entries == 3 and stats.bytes == 3 * a.nbytes <= tier.max_bytes
    tier.put(d.key, d)  # overwriting does not count twice
    assert tier.stats().bytes == 3 * a.nbytes
    huge = random_chunk(seed=9, tokens=80)
    assert huge.nbytes > tier.max_bytes and tier.put(huge.key, huge) is False
    assert tier.stats().entries == 3  # a too-large entry does not flush the cache


def _disk_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.kv.safetensors"))


def test_disk_lru_honours_its_budget_and_survives_a_restart(tmp_path):
    chunks = [random_chunk(seed=s) for s in range(5)]
    size = len(serialize(chunks[0]))
    root = tmp_path / "kv"
    tier = DiskTier(root, max_bytes=3 * size + size // 2)
    a, b, c, d, e = chunks
    for kv in (a, b, c):
        assert tier.put(kv.key, kv)
        time.sleep(0.02)  # distinct mtimes (the kernel's file clock is coarse)
    assert tier.get(a.key) is not None  # a hit makes a the most recently used
    time.sleep(0.02)
    assert tier.put(d.key, d)
    assert [tier.contains(kv.key) for kv in (a, b, c, d)] == [True, False, True, True]
    assert _disk_bytes(root) <= tier.max_bytes and tier.stats().evictions == 1
    assert tier.put(d.key, d)  # overwriting one entry evicts nothing
    assert [tier.contains(kv.key) for kv in (a, c, d)] == [True, True, True]
    # A new tier object on the same directory (a restart) sees the entries and keeps the same budget.
    time.sleep(0.02)
    again = DiskTier(root, max_bytes=3 * size + size // 2)
    assert again.stats().bytes == _disk_bytes(root) == 3 * size
    assert_same_kv(again.get(c.key), c)
    time.sleep(0.02)
    assert again.put(e.key, e)
    assert [again.contains(kv.key) for kv in (a, c, d, e)] == [False, True, True, True]
    assert _disk_bytes(root) <= again.max_bytes
    assert again.put_bytes(e.key, b"x" * (again.max_bytes + 1)) is False  # larger than the whole budget


# --- damaged entries -----------------------------------------------------------------------------------


def _offset_in(blob: bytes, what: str) -> int:
    header, meta, base = split_entry(blob)
    if what == "token ids":
        return tensor_span(blob, "token_ids")[0] + 3
    if what == "k.1 middle":
        start, end = tensor_span(blob, "k.1")
        return (start + end) // 2
    if what == "last byte":
        return len(blob) - 1
    if what == "metadata fingerprint":
        return blob.index(meta["fingerprint"].encode()) + 5
    if what == "base position":
        return blob.index(b'"base_position":"') + len(b'"base_position":"')
    if what == "header length":
        return 0
    raise ValueError(what)


def _assert_dropped(tier, raw, key, caplog, layers=None):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvblend.store"):
        assert tier.get(key, layers) is None
    assert not raw.exists(key), "a bad entry must be removed"
    assert any("bad entry" in r.getMessage() for r in caplog.records), "a bad entry must be logged"
    assert tier.stats().corrupt >= 1
    assert tier.get(key) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["token ids", "k.1 middle", "last byte", "metadata fingerprint", "base position", "header length"])
@pytest.mark.parametrize("sliced", [False, True])
def test_bit_flip_is_detected_removed_and_logged(stored, caplog, dtype, where, sliced):
    tier, raw = stored
    kv = random_chunk(seed=11, dtype=dtype)
    tier.put(kv.key, kv)
    raw.flip(kv.key, _offset_in(raw.read(kv.key), where))
    layers = [1] if sliced else None  # the sliced read asks for the damaged layer where the damage is in one
    if sliced and where == "last byte":
        layers = [3]
    _assert_dropped(tier, raw, kv.key, caplog, layers)


def test_get_many_drops_a_damaged_entry_and_serves_the_others(stored, caplog):
    tier, raw = stored
    chunks = [random_chunk(seed=40 + s) for s in range(3)]
    for kv in chunks:
        tier.put(kv.key, kv)
    raw.flip(chunks[1].key, _offset_in(raw.read(chunks[1].key), "k.1 middle"))
    with caplog.at_level(logging.WARNING, logger="kvblend.store"):
        got = tier.get_many([kv.key for kv in chunks], chunks[0].layout)
    assert got[1] is None and not raw.exists(chunks[1].key)
    assert_same_kv(got[0], chunks[0])
    assert_same_kv(got[2], chunks[2])
    assert tier.counters().corrupt == 1 and any("bad entry" in r.getMessage() for r in caplog.records)


LARGE = {"layers": 8, "tokens": 256, "heads": 8, "head_dim": 64, "dtype": torch.float32}  # 8 MiB: read on threads


@pytest.mark.parametrize("damage", [None, "first layer", "last layer"])
def test_large_disk_entry_read_on_threads_is_exact_and_verified(tmp_path, damage):
    """An entry above the parallel threshold: `get` reads runs of layers on threads, `get_many` one entry per
    thread; both return it bit for bit, and both reject one flipped bit in any layer."""
    tier = DiskTier(tmp_path / "kv", 1 << 30)
    raw = DiskRaw(tier)
    kvs = [random_chunk(seed=50 + s, **LARGE) for s in range(2)]
    for kv in kvs:
        tier.put(kv.key, kv)
    blob = raw.read(kvs[0].key)
    if damage is not None:
        start, end = tensor_span(blob, "v.0" if damage == "first layer" else f"v.{LARGE['layers'] - 1}")
        bad = bytearray(blob)
        bad[(start + end) // 2] ^= 0x10
        raw.write(kvs[0].key, bytes(bad))
    got = tier.get_many([kv.key for kv in kvs], kvs[0].layout)
    assert_same_kv(got[1], kvs[1])
    if damage is None:
        assert_same_kv(got[0], kvs[0])
        assert_same_kv(tier.get(kvs[0].key, None, kvs[0].layout), kvs[0])
        return
    assert got[0] is None
    raw.write(kvs[0].key, bytes(bad))
    assert tier.get(kvs[0].key, None, kvs[0].layout) is None
    assert tier.counters().corrupt == 2


@pytest.mark.parametrize("state", ["empty", "zeros where the data was not yet written", "short"])
@pytest.mark.parametrize("read", ["get", "get_many"])
def test_disk_entry_torn_by_a_crash_is_a_removed_miss(tmp_path, caplog, state, read):
    """Disk entries are renamed into place without fsync (a cache: a lost entry is recomputed). After a crash
    the file under its final name can be empty, hold zeros where delayed allocation had not written the data,
    or be short: each is rejected by its size, header digest or layer digests, removed and counted."""
    tier = DiskTier(tmp_path / "kv", 1 << 30)
    raw = DiskRaw(tier)
    kv, other = random_chunk(seed=60), random_chunk(seed=61)
    tier.put(kv.key, kv)
    tier.put(other.key, other)
    blob = raw.read(kv.key)
    start = tensor_span(blob, "k.0")[0]
    torn = {"empty": b"", "zeros where the data was not yet written": blob[:start] + bytes(len(blob) - start),
            "short": blob[: len(blob) * 2 // 3]}[state]
    raw.write(kv.key, torn)
    with caplog.at_level(logging.WARNING, logger="kvblend.store"):
        if read == "get":
            assert tier.get(kv.key, None, kv.layout) is None
        else:
            got = tier.get_many([kv.key, other.key], kv.layout)
            assert got[0] is None
            assert_same_kv(got[1], other)
    assert not raw.exists(kv.key) and tier.counters().corrupt == 1


@pytest.mark.parametrize("keep", ["empty", "7 bytes", "header only", "half", "all but one byte"])
@pytest.mark.parametrize("sliced", [False, True])
def test_truncated_entry_is_detected_removed_and_logged(stored, caplog, keep, sliced):
    tier, raw = stored
    kv = random_chunk(seed=12, dtype=torch.bfloat16)
    tier.put(kv.key, kv)
    blob = raw.read(kv.key)
    length = {"empty": 0, "7 bytes": 7, "header only": split_entry(blob)[2], "half": len(blob) // 2,
              "all but one byte": len(blob) - 1}[keep]
    if keep == "empty" and isinstance(raw, RedisRaw):
        raw.write(kv.key, b"\0")  # Redis cannot hold an empty string that differs from "no key"
    else:
        raw.truncate(kv.key, length)
    _assert_dropped(tier, raw, kv.key, caplog, [0] if sliced else None)


@pytest.mark.parametrize("sliced", [False, True])
def test_entry_of_another_model_is_rejected(stored, caplog, sliced):
    """An entry that sits under a key of another fingerprint (a mix-up) fails the metadata check."""
    tier, raw = stored
    kv = random_chunk(seed=13, fingerprint="model-A")
    other = ChunkKey.for_tokens("model-B", kv.token_ids.tolist())
    raw.write(other, serialize(kv))
    _assert_dropped(tier, raw, other, caplog, [0] if sliced else None)
    tier.put(kv.key, kv)
    assert_same_kv(tier.get(kv.key), kv)  # under its own key it is fine


@pytest.mark.parametrize("relabel", ["tensors BF16 as F16", "metadata bfloat16 as float16", "tensors F32 as I32"])
def test_entry_whose_dtype_disagrees_is_rejected(stored, caplog, relabel):
    tier, raw = stored
    if relabel == "tensors F32 as I32":
        kv = random_chunk(seed=14, dtype=torch.float32)
        blob = retag_tensor_dtype(serialize(kv), "I32")
    else:
        kv = random_chunk(seed=14, dtype=torch.bfloat16)
        blob = serialize(kv)
        blob = retag_tensor_dtype(blob, "F16") if relabel.startswith("tensors") else retag_metadata(blob, dtype="float16")
    raw.write(kv.key, blob)
    _assert_dropped(tier, raw, kv.key, caplog)


def test_redis_stats_count_only_this_prefix_even_with_glob_characters(redis_url, redis_prefix):
    odd = RedisTier(RedisConfig(redis_url, prefix=redis_prefix + "odd[1]*?:"))
    plain = RedisTier(RedisConfig(redis_url, prefix=redis_prefix + "odd1x:"))  # what an unescaped glob would match
    for seed, tier in ((1, odd), (2, odd), (3, plain)):
        kv = random_chunk(seed=seed)
        tier.put(kv.key, kv)
    assert odd.stats().entries == 2 and plain.stats().entries == 1
