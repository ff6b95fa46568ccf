"""ChunkKey: same model + same tokens -> same key in any process; any difference -> another key."""

import hashlib
import random
import json
import struct

import numpy as np
import pytest
import torch

from kvblend.store.key import KEY_VERSION, WHOLE, ChunkKey, prefix_chained_keys, token_ids_hash, tp_shard
from test_store_helpers import python_env, run_python

FP = "fp-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
TOKENS = [1, 42, 7, 65535, 2**31 + 5, 0, 128000]


def test_key_changes_with_any_input():
    base = ChunkKey.for_tokens(FP, TOKENS, "default", "alone")
    variants = {
        "fingerprint": ChunkKey.for_tokens(FP + "b", TOKENS),
        "fingerprint case": ChunkKey.for_tokens(FP.upper(), TOKENS),
        "namespace": ChunkKey.for_tokens(FP, TOKENS, "wiki"),
        "context": ChunkKey.for_tokens(FP, TOKENS, "default", "behind_prefix:0123456789abcdef"),
        "prefix hash": ChunkKey.for_tokens(FP, TOKENS, "default", "behind_prefix:0123456789abcdee"),
        "one more token": ChunkKey.for_tokens(FP, TOKENS + [3]),
        "one token fewer": ChunkKey.for_tokens(FP, TOKENS[:-1]),
        "swapped tokens": ChunkKey.for_tokens(FP, [TOKENS[1], TOKENS[0], *TOKENS[2:]]),
    }
    for i in range(len(TOKENS)):
        changed = list(TOKENS)
        changed[i] += 1
        variants[f"token {i} + 1"] = ChunkKey.for_tokens(FP, changed)
    digests = [base.digest] + [key.digest for key in variants.values()]
    assert len(set(digests)) == len(digests), "two different inputs share a key"
    for name, key in variants.items():
        assert key != base, name
        assert len(key.digest) == 64 and int(key.digest, 16) >= 0


def test_shards_of_tensor_parallel_ranks_are_distinct_keys():
    """Rank, world size and head range each give another key; the whole KV keeps the key it had before shards."""
    whole = ChunkKey.for_tokens(FP, TOKENS)
    assert whole.shard == WHOLE and tp_shard(1, 0, 0, 8) == WHOLE and whole.for_shard(WHOLE) is whole
    assert whole.digest == hashlib.sha256("\0".join(
        (KEY_VERSION, FP, "default", "alone", token_ids_hash(TOKENS), str(len(TOKENS)))).encode()).hexdigest()
    shards = [tp_shard(2, 0, 0, 4), tp_shard(2, 1, 4, 8), tp_shard(4, 1, 4, 8), tp_shard(2, 0, 0, 2),
              tp_shard(4, 0, 0, 1), tp_shard(4, 1, 0, 1)]  # the last two: one KV head replicated on two ranks
    digests = {whole.digest} | {whole.for_shard(s).digest for s in shards}
    assert len(digests) == len(shards) + 1
    assert whole.for_shard(shards[0]).for_shard(WHOLE) == whole
    for bad in ("tp2", "tp0.r0.h0-1", "tp2.r0.h0-1;x"):
        with pytest.raises(ValueError, match="shard"):
            whole.for_shard(bad)
    with pytest.raises(ValueError, match="not a shard"):
        tp_shard(2, 2, 0, 1)


def test_key_is_independent_of_the_token_container():
    want = ChunkKey.for_tokens(FP, TOKENS)
    for ids in (tuple(TOKENS), np.array(TOKENS, dtype=np.int64), torch.tensor(TOKENS), np.array(TOKENS, dtype=np.uint64)):
        key = ChunkKey.for_tokens(FP, ids)
        assert key == want and key.digest == want.digest and str(key) == want.digest
    assert hash(ChunkKey.for_tokens(FP, TOKENS)) == hash(want)


def test_token_hash_is_little_endian_int64():
    """Platform independent by construction: the same bytes on any machine."""
    explicit = hashlib.sha256(struct.pack(f"<{len(TOKENS)}q", *TOKENS)).hexdigest()
    assert token_ids_hash(TOKENS) == explicit


def test_key_is_the_same_in_another_process():
    cases = [
        (FP, TOKENS, "default", "alone"),
        ("other-model", list(range(300)), "wiki.v2", "behind_prefix:deadbeefdeadbeef"),
        (FP, [5], "ns:1", "alone"),
    ]
    here = [ChunkKey.for_tokens(*case).digest for case in cases]
    code = (
        "import json, sys\n"
        "from kvblend.store.key import ChunkKey\n"
        "cases = json.loads(sys.argv[1])\n"
        "print(json.dumps([ChunkKey.for_tokens(*c).digest for c in cases]))\n"
    )
    env = python_env()
    env["PYTHONHASHSEED"] = "12345"  # hash randomisation must not matter
    there = json.loads(run_python(code, json.dumps(cases), env=env))
    assert there == here


@pytest.mark.parametrize(
    "args",
    [
        ("", [1, 2]),  # no fingerprint
        (FP, []),  # no tokens
        (FP, [1], "bad namespace"),
        (FP, [1], "x" * 129),
        (FP, [1], "default", "somewhere"),
    ],
)
def test_key_rejects_bad_inputs(args):
    with pytest.raises(ValueError):
        ChunkKey.for_tokens(*args)


@pytest.mark.parametrize("length", [1, 127, 128, 129, 640, 1000])
@pytest.mark.parametrize("span", [1, 16, 128])
def test_prefix_chained_keys_equal_the_per_prefix_keys(length, span):
    """The running hash gives exactly the keys `ChunkKey.behind` gives each span (stored keys unchanged)."""
    ids = random.Random(length * 1000 + span).choices(range(50_000), k=length)
    keys = prefix_chained_keys("fp", ids, span, "ns")
    want = [ChunkKey.behind("fp", ids[s : s + span], ids[:s], "ns") for s in range(0, length - span + 1, span)]
    assert keys == want and [k.digest for k in keys] == [k.digest for k in want]
    assert len(keys) == length // span and (not keys or keys[0].is_alone)


def test_entries_stored_under_the_previous_key_version_are_misses_not_errors(tmp_path, monkeypatch):
    """Chunks are keyed by their own text's ids since key version 2: what a v1 store holds is never read."""
    from kvblend.store import DiskTier
    from kvblend.store import key as key_module
    from test_store_helpers import random_chunk

    chunk = random_chunk()
    monkeypatch.setattr(key_module, "KEY_VERSION", "kvblend-chunk-v1")
    old_digest = chunk.key.digest
    assert DiskTier(tmp_path, 1 << 30).put(chunk.key, chunk)
    monkeypatch.undo()
    tier = DiskTier(tmp_path, 1 << 30)
    assert chunk.key.digest != old_digest and key_module.KEY_VERSION == "kvblend-chunk-v2"
    assert tier.get(chunk.key) is None and not tier.contains(chunk.key)
    stats = tier.counts.snapshot()
    assert stats.errors == stats.corrupt == 0 and stats.misses == 1
