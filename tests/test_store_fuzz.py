"""Fuzzing the tiers' public `get` with damaged and forged entries: random bit flips, truncation, appended junk,
header edits that keep every byte count, forgeries with recomputed digests (with and without the deployment
secret), forged layer counts. Every case must be a clean miss: 0 accepted, 0 exceptions."""

import json
import logging
import random
import struct
from collections import Counter

import pytest
import torch

from kvblend.store import DiskTier, MemoryTier, RedisConfig, RedisTier
from kvblend.store.entry import ChunkKV, serialize
from test_store_helpers import assert_same_kv, random_chunk, rebuild_entry, reseal, split_entry

SECRET = b"fuzz-deployment-secret-0123456789"
GUESSED = b"attacker-guessed-secret-987654321"
CASES = 600  # per tier and secret mode: 1,200 per tier
SHAPE = dict(layers=4, tokens=8, heads=2, head_dim=16)  # a small entry: 4 KiB of random K and V
JUNK_VALUES = ["", "0", "-1", "3", "5", "99999999999999999999", "x", "[]", "null", "1e3", " 4", "\u0664", "4.0"]


def _table_copy(header: dict) -> dict:
    return json.loads(json.dumps(header))


def _reshaped(rng: random.Random, header: dict) -> dict:
    """One tensor's shape permuted, flattened or split: the same byte count under another shape."""
    table = _table_copy(header)
    name = rng.choice(sorted(table))
    shape = table[name]["shape"]
    new = shape
    while new == shape:
        how = rng.choice(["permute", "flatten", "split", "unsqueeze"])
        if how == "permute":
            new = rng.sample(shape, len(shape))
        elif how == "split":
            axis = rng.choice([i for i, n in enumerate(shape) if n % 2 == 0])
            new = shape[:axis] + [2, shape[axis] // 2] + shape[axis + 1 :]
        elif how == "unsqueeze":
            axis = rng.randrange(len(shape) + 1)
            new = shape[:axis] + [1] + shape[axis:]
        else:
            new = [int(torch.tensor(shape).prod())]
    table[name]["shape"] = new
    return table


def _relabelled(rng: random.Random, header: dict) -> dict:
    table = _table_copy(header)
    name = rng.choice(sorted(table))
    table[name]["dtype"] = rng.choice([d for d in ("BF16", "F16", "I16", "U16", "F32", "I64", "F64") if d != table[name]["dtype"]])
    return table


def _offsets_swapped(rng: random.Random, header: dict) -> dict:
    table = _table_copy(header)
    a, b = rng.sample(sorted(n for n in table if n != "token_ids"), 2)
    table[a]["data_offsets"], table[b]["data_offsets"] = table[b]["data_offsets"], table[a]["data_offsets"]
    return table


def _layer_count_forged(rng: random.Random, blob: bytes) -> tuple[dict, dict, bytes]:
    """An entry that claims fewer or more layers: tensors cut or duplicated, digests kept consistent."""
    header, meta, base = split_entry(blob)
    layers = int(meta["num_layers"])
    digests = json.loads(meta["layer_digests"])
    data = bytearray(blob[base:])
    table = _table_copy(header)
    target = rng.choice([0, 1, layers - 1, layers + 1, layers + 3, 99999])
    if target < layers:
        for layer in range(target, layers):
            del table[f"k.{layer}"], table[f"v.{layer}"]
        end = max(info["data_offsets"][1] for info in table.values())
        data = data[:end]
        digests = digests[:target]
    else:
        for layer in range(layers, min(target, layers + 3)):
            src = rng.randrange(layers)
            for kv in "kv":
                start, stop = header[f"{kv}.{src}"]["data_offsets"]
                table[f"{kv}.{layer}"] = {**header[f"{kv}.{src}"], "data_offsets": [len(data), len(data) + stop - start]}
                data += blob[base + start : base + stop]
            digests.append(digests[src])
    return table, {**meta, "num_layers": str(target), "layer_digests": json.dumps(digests)}, bytes(data)


def _values_rewritten(rng: random.Random, blob: bytes) -> tuple[dict, dict, bytes]:
    """The attacker's values in one layer, its digest recomputed: detectable only with a secret."""
    from kvblend.store.entry import _layer_digest

    header, meta, base = split_entry(blob)
    layer = rng.randrange(int(meta["num_layers"]))
    data = bytearray(blob[base:])
    k0, k1 = header[f"k.{layer}"]["data_offsets"]
    v0, v1 = header[f"v.{layer}"]["data_offsets"]
    data[k0:k1] = rng.randbytes(k1 - k0)
    digests = json.loads(meta["layer_digests"])
    digests[layer] = _layer_digest(bytes(data[k0:k1]), bytes(data[v0:v1]))
    return header, {**meta, "layer_digests": json.dumps(digests)}, bytes(data)


def _header_replaced(rng: random.Random, blob: bytes) -> bytes:
    """A header that is valid JSON of the wrong structure (or no JSON at all), the data left as it was."""
    _, _, base = split_entry(blob)
    raw = rng.choice([b"[]", b"null", b'{"__metadata__": 5}', b'{"__metadata__": {"a": 1}}', b"[" * 5000 + b"]" * 5000,
                      b'{"__metadata__": {}, "k.0": "x"}', rng.randbytes(40), b'{"a":' * 3000 + b"1" + b"}" * 3000])
    return struct.pack("<Q", len(raw)) + raw + blob[base:]


def mutations(rng: random.Random, blob: bytes, secret: bytes | None, other: bytes):
    """(kind, damaged or forged bytes) that a reader with `secret` must refuse. `other` is a valid entry of
    another key (the attacker's own)."""
    header, meta, _ = split_entry(blob)
    forger_keys = [None, GUESSED]  # a forger never has the reader's secret
    while True:
        kind = rng.choice(["flip", "flips", "truncate", "append", "reshape", "reshape resealed", "relabel resealed",
                           "offsets resealed", "layer count", "metadata", "metadata resealed", "header", "foreign",
                           "unkeyed" if secret else "keyed", "values resealed" if secret else "key fields resealed"])
        out = bytearray(blob)
        if kind == "flip":
            offset = rng.randrange(len(out))
            out[offset] ^= 1 << rng.randrange(8)
        elif kind == "flips":
            for offset in rng.sample(range(len(out)), rng.randint(2, 8)):
                out[offset] ^= rng.randrange(1, 256)
        elif kind == "truncate":
            out = out[: rng.randrange(len(out))]
        elif kind == "append":
            out += rng.randbytes(rng.randint(1, 64))
        elif kind == "reshape":  # under the original digest
            out = bytearray(rebuild_entry(blob, _reshaped(rng, header), meta))
        elif kind == "reshape resealed":
            out = bytearray(reseal(blob, _reshaped(rng, header), meta, rng.choice(forger_keys)))
        elif kind == "relabel resealed":
            out = bytearray(reseal(blob, _relabelled(rng, header), meta, rng.choice(forger_keys)))
        elif kind == "offsets resealed":
            out = bytearray(reseal(blob, _offsets_swapped(rng, header), meta, rng.choice(forger_keys)))
        elif kind == "layer count":
            table, edited, data = _layer_count_forged(rng, blob)
            out = bytearray(reseal(blob, table, edited, rng.choice(forger_keys), data=data))
        elif kind in ("metadata", "metadata resealed"):
            field = rng.choice(sorted(set(meta) - {"header_digest", "check"}))
            edited = {**meta, field: rng.choice(JUNK_VALUES)}
            if edited[field] == meta[field]:
                edited[field] += "0"
            if kind == "metadata":
                out = bytearray(rebuild_entry(blob, header, edited))
            else:
                if field == "base_position" and secret is None:
                    edited[field] = "x"  # a plausible base position is undetectable without a secret
                out = bytearray(reseal(blob, header, edited, rng.choice(forger_keys)))
        elif kind == "header":
            out = bytearray(_header_replaced(rng, blob))
        elif kind == "foreign":  # a valid entry of another key, stored under this one
            out = bytearray(other)
        elif kind == "keyed":  # a reader without the secret cannot check a MAC: it refuses the entry
            out = bytearray(reseal(blob, header, meta, GUESSED))
        elif kind == "unkeyed":
            out = bytearray(reseal(blob, header, meta, None))
        elif kind == "values resealed":
            table, edited, data = _values_rewritten(rng, blob)
            out = bytearray(reseal(blob, table, edited, rng.choice(forger_keys), data=data))
        elif kind == "key fields resealed":
            field = rng.choice(["fingerprint", "namespace", "context", "num_tokens", "token_ids_hash", "key"])
            out = bytearray(reseal(blob, header, {**meta, field: meta[field][:-1] + "9"}, None))
        if bytes(out) != blob:
            yield kind, bytes(out)


# Damage that any read must notice (whatever layers it asks for); the others may spare a sliced read's layers.
ANY_READ_FAILS = {"truncate", "append", "reshape", "reshape resealed", "relabel resealed", "layer count", "metadata",
                  "metadata resealed", "header", "foreign", "keyed", "unkeyed", "key fields resealed"}


def _disk(tmp_path, secret):
    tier = DiskTier(tmp_path / "kv", 1 << 30, secret)

    def write(key, blob):
        tier.path(key).parent.mkdir(exist_ok=True)
        tier.path(key).write_bytes(blob)

    return tier, write


def _redis(url, prefix, secret):
    import redis

    tier = RedisTier(RedisConfig(url, prefix=prefix, timeout_s=5.0), secret)
    client = redis.Redis.from_url(url, socket_timeout=5)
    return tier, lambda key, blob: client.set(prefix + key.digest, blob)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["unkeyed", "secret"])
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_fuzzed_entries_are_all_clean_misses(kind, secret, tmp_path, request, caplog):
    if kind == "disk":
        tier, write = _disk(tmp_path, secret)
    else:
        tier, write = _redis(request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"), secret)
    kv, other = random_chunk(seed=21, **SHAPE), random_chunk(seed=22, **SHAPE)
    blob, foreign = serialize(kv, secret), serialize(other, secret)
    write(kv.key, blob)
    assert_same_kv(tier.get(kv.key, None, kv.layout), kv)  # the intact entry is served: the test can fail
    rng = random.Random(f"{kind}-{secret is not None}")
    caplog.set_level(logging.CRITICAL, logger="kvblend.store")  # 1,000s of expected warnings
    accepted, crashed, kinds, reads = [], [], Counter(), 0
    for _, (what, bad) in zip(range(CASES), mutations(rng, blob, secret, foreign)):
        kinds[what] += 1
        attempts = [(None, kv.layout)]
        if what != "layer count":  # a consistent entry of fewer layers is only wrong for the model
            attempts.append((None, None))
        if what in ANY_READ_FAILS:
            attempts.append((sorted(rng.sample(range(SHAPE["layers"]), rng.randint(1, 2))), kv.layout))
        for layers, expect in attempts:
            write(kv.key, bad)  # a refused entry may have been removed: every read sees the damage
            reads += 1
            try:
                got = tier.get(kv.key, layers, expect)
            except Exception as exc:  # noqa: BLE001 - any exception is a failure here
                crashed.append((what, repr(exc)[:200]))
                continue
            if got is not None:
                accepted.append(what)
            if layers is None:  # the batched read (one MGET; disk: entries on threads) verifies as get does
                write(kv.key, bad)
                reads += 1
                try:
                    got = tier.get_many([kv.key, other.key], expect)[0]
                except Exception as exc:  # noqa: BLE001 - any exception is a failure here
                    crashed.append((what, repr(exc)[:200]))
                    continue
                if got is not None:
                    accepted.append(f"{what} (get_many)")
    assert not crashed, crashed[:5]
    assert not accepted, Counter(accepted)
    assert sum(kinds.values()) == CASES and len(kinds) == 15, kinds
    write(kv.key, blob)
    assert_same_kv(tier.get(kv.key, [1], kv.layout), kv, layers=[1])
    assert_same_kv(tier.get_many([kv.key, other.key], kv.layout)[0], kv)


def test_fuzzed_layouts_are_misses_in_the_memory_tier():
    """The memory tier holds decoded entries: any layout other than the model's is a miss (and dropped)."""
    model = random_chunk(seed=23, **SHAPE)
    tier = MemoryTier(1 << 30)
    rng = random.Random(7)
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    cases = 0
    while cases < 1000:
        layers, heads, head_dim = rng.randint(1, 6), rng.randint(1, 3), rng.choice([8, 16, 32])
        dtype = rng.choice(dtypes)
        shape = (layers, SHAPE["tokens"], heads, head_dim)
        forged = ChunkKV(model.key, torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), model.token_ids)
        if forged.layout == model.layout:
            continue
        cases += 1
        tier.put(model.key, forged)
        assert tier.get(model.key, None, model.layout) is None
        tier.put(model.key, forged)
        assert tier.get(model.key, [rng.randrange(SHAPE["layers"])], model.layout) is None
    assert tier.stats().corrupt == 2000
    tier.put(model.key, model)
    assert_same_kv(tier.get(model.key, None, model.layout), model)
