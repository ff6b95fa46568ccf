"""ChunkAnchorIndex: chunks found anywhere in a prompt by content hash, across processes (disk) and hosts (Redis)."""

import random
import subprocess
import sys

from kvblend.store import ChunkAnchorIndex, RedisConfig, RedisTier
from kvblend.store.anchors import ANCHOR_TOKENS


def chunks(seed: int, sizes=(40, 70, 23, 100)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(n)] for n in sizes]


def prompt_with(parts: list[list[int]], seed: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Parts shuffled, with random plain tokens before, between and after; returns the spans they occupy."""
    rng = random.Random(seed)
    order = parts[:]
    rng.shuffle(order)
    prompt, spans = [rng.randrange(49152) for _ in range(9)], []
    for part in order:
        spans.append((len(prompt), len(part)))
        prompt += part + [rng.randrange(49152) for _ in range(rng.randrange(0, 5))]
    return prompt + [1, 2, 3], spans


def test_finds_chunks_in_any_order_with_gaps():
    index = ChunkAnchorIndex()
    parts = chunks(0)
    for p in parts:
        assert index.add(p)
    prompt, spans = prompt_with(parts, 1)
    assert index.find(prompt) == spans


def test_same_anchor_different_tail_is_not_a_match():
    index = ChunkAnchorIndex()
    a = chunks(2, (60,))[0]
    index.add(a)
    b = a[:ANCHOR_TOKENS + 5] + [7] * 30
    assert index.find([5, 6] + b + [1]) == []
    assert index.find([5, 6] + a + [1]) == [(2, 60)]


def test_longest_registered_chunk_wins_and_short_chunks_are_not_indexed():
    index = ChunkAnchorIndex()
    long = chunks(3, (80,))[0]
    index.add(long[:30])
    index.add(long)
    assert not index.add(long[:ANCHOR_TOKENS - 1])
    assert index.find([9] + long) == [(1, 80)]
    assert index.find([9] + long[:30] + [4, 4]) == [(1, 30)]


def test_disk_index_is_shared_between_processes(tmp_path):
    parts = chunks(4)
    code = (
        "import sys, json; from kvblend.store import ChunkAnchorIndex; "
        f"idx = ChunkAnchorIndex({str(tmp_path)!r}); [idx.add(p) for p in json.loads(sys.argv[1])]"
    )
    import json

    subprocess.run([sys.executable, "-c", code, json.dumps(parts)], check=True)
    prompt, spans = prompt_with(parts, 5)
    assert ChunkAnchorIndex(tmp_path).find(prompt) == spans


def test_redis_index_is_shared_and_survives_an_outage(private_redis, caplog):
    parts = chunks(6)
    writer = ChunkAnchorIndex(redis=RedisTier(RedisConfig(private_redis.url)))
    for p in parts:
        writer.add(p)
    prompt, spans = prompt_with(parts, 7)
    reader = ChunkAnchorIndex(redis=RedisTier(RedisConfig(private_redis.url, retry_s=60)))
    assert reader.find(prompt) == spans
    private_redis.stop()
    assert reader.find(prompt) == []
    assert writer.add(chunks(8, (30,))[0])
