"""The safetensors entry: bit-exact round trip, metadata, layer-sliced reads, and every kind of damage detected."""

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from kvblend.store.entry import (
    FORMAT_VERSION,
    BytesSource,
    EntryError,
    EntryRefused,
    KVLayout,
    entry_secret,
    read_entry,
    serialize,
)
from kvblend.store.key import ChunkKey, tp_shard
from test_store_helpers import (
    assert_same_kv,
    flip,
    random_chunk,
    rebuild_entry,
    reseal,
    retag_metadata,
    retag_tensor_dtype,
    split_entry,
    tensor_span,
)

SECRET = b"test-deployment-secret-0123456789"


def read(blob: bytes, key: ChunkKey, layers=None, sized: bool = True, expect=None, secret=None):
    return read_entry(BytesSource(blob), key, layers, len(blob) if sized else None, expect, secret)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    kv = random_chunk(seed=3, dtype=dtype, base_position=11)
    assert_same_kv(read(serialize(kv), kv.key), kv)


def test_entry_is_plain_safetensors_with_metadata(tmp_path):
    context = "behind_prefix:00ff00ff00ff00ff"
    kv = random_chunk(seed=1, dtype=torch.bfloat16, namespace="wiki", context=context, base_position=9)
    blob = serialize(kv)
    tensors = load(blob)  # safetensors' own parser: no pickle anywhere
    assert set(tensors) == {"token_ids"} | {f"{kv_}.{i}" for i in range(4) for kv_ in "kv"}
    assert torch.equal(tensors["k.2"].view(torch.int16), kv.k[2].view(torch.int16))
    path = tmp_path / "e.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    key = kv.key
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["fingerprint"] == key.fingerprint and meta["namespace"] == "wiki" and meta["context"] == key.context
    assert meta["num_tokens"] == "17" and meta["token_ids_hash"] == key.tokens_hash and meta["key"] == key.digest
    assert meta["base_position"] == "9" and meta["dtype"] == "bfloat16" and meta["num_layers"] == "4"
    assert meta["kv_heads"] == "3" and meta["head_dim"] == "64" and meta["check"] == "blake3"
    assert len(meta["header_digest"]) == 64 and len(json.loads(meta["layer_digests"])) == 4
    assert b"\x80\x04" not in blob[:16]  # not a pickle stream


def test_sliced_read_fetches_only_the_requested_tensors():
    kv = random_chunk(seed=2, dtype=torch.float32, layers=8, tokens=64)
    blob = serialize(kv)
    ranges = []

    class RecordingSource(BytesSource):
        def read(self, wanted):
            ranges.extend(wanted)
            return super().read(wanted)

        def read_into(self, targets):
            ranges.extend((offset, sum(b.nbytes for b in bufs)) for offset, bufs in targets)
            super().read_into(targets)

    got = read_entry(RecordingSource(blob), kv.key, [5, 1])
    assert_same_kv(got, kv, layers=[5, 1])
    _, _, base = split_entry(blob)
    token_start, token_end = tensor_span(blob, "token_ids")
    allowed = [(0, 8), (8, base - 8), (token_start, token_end - token_start)] + [
        (tensor_span(blob, f"k.{i}")[0], tensor_span(blob, f"v.{i}")[1] - tensor_span(blob, f"k.{i}")[0]) for i in (5, 1)
    ]  # a layer's K and V are adjacent: one range
    assert sorted(ranges) == sorted(allowed)
    assert sum(n for _, n in ranges) < len(blob) / 3


def test_bad_layer_requests_are_the_callers_error_not_a_bad_entry():
    kv = random_chunk(seed=2)
    blob = serialize(kv)
    for layers, expect in (([-1], None), ([], None), ([0, "1"], None), ([4], kv.layout), ([0, 9], kv.layout)):
        with pytest.raises(ValueError) as info:
            read(blob, kv.key, layers, expect=expect)
        assert not isinstance(info.value, EntryError)
    for layers in ([4], [0, 9]):  # without the model's layout: the entry may be short, so a refused (kept) entry
        with pytest.raises(EntryRefused):
            read(blob, kv.key, layers)


def test_every_header_bit_flip_is_detected():
    kv = random_chunk(seed=4, dtype=torch.bfloat16, base_position=3)
    blob = serialize(kv)
    _, _, base = split_entry(blob)
    for offset in range(base):
        for mask in (0x01, 0x04, 0x40):
            with pytest.raises(EntryError):
                read(flip(blob, offset, mask), kv.key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_payload_bit_flips_are_detected(dtype):
    kv = random_chunk(seed=5, dtype=dtype)
    blob = serialize(kv)
    header, _, base = split_entry(blob)
    offsets = {base, len(blob) - 1}
    for name in header:  # first and last byte of every tensor, token ids included
        start, end = tensor_span(blob, name)
        offsets |= {start, end - 1}
    rng = random.Random(0)
    offsets |= {rng.randrange(base, len(blob)) for _ in range(300)}
    for offset in sorted(offsets):
        bad = flip(blob, offset, 1 << rng.randrange(8))
        with pytest.raises(EntryError):
            read(bad, kv.key)
        with pytest.raises(EntryError):  # the unsized path (Redis GETRANGE) too
            read(bad, kv.key, sized=False)


def test_sliced_read_checks_its_layers_and_ignores_the_others():
    kv = random_chunk(seed=6)
    blob = serialize(kv)
    start, end = tensor_span(blob, "v.2")
    bad = flip(blob, (start + end) // 2)
    with pytest.raises(EntryError):
        read(bad, kv.key, [2])
    with pytest.raises(EntryError):
        read(bad, kv.key)
    assert_same_kv(read(bad, kv.key, [0, 3]), kv, layers=[0, 3])  # layer 2's bytes were never read


def test_truncation_is_detected():
    kv = random_chunk(seed=7)
    blob = serialize(kv)
    _, _, base = split_entry(blob)
    for length in (0, 3, 8, 9, base // 2, base, base + 1, base + 200, len(blob) // 2, len(blob) - 1):
        with pytest.raises(EntryError):
            read(blob[:length], kv.key)
        with pytest.raises(EntryError):
            read(blob[:length], kv.key, sized=False)
        with pytest.raises(EntryError):  # a sliced read of intact layers still sees the entry is cut short
            read(blob[:length], kv.key, [0])
    with pytest.raises(EntryError):
        read(blob + b"\0", kv.key, [0])


def test_entry_of_another_key_is_rejected():
    kv = random_chunk(seed=8, namespace="ns", context="alone")
    blob = serialize(kv)
    ids = kv.token_ids.tolist()
    others = [
        ChunkKey.for_tokens("another-model-fingerprint", ids, "ns", "alone"),
        ChunkKey.for_tokens(kv.key.fingerprint, ids, "other", "alone"),
        ChunkKey.for_tokens(kv.key.fingerprint, ids, "ns", "behind_prefix:1111111111111111"),
        ChunkKey.for_tokens(kv.key.fingerprint, ids[:-1] + [ids[-1] + 1], "ns", "alone"),
    ]
    for key in others:
        with pytest.raises(EntryError):
            read(blob, key)


def test_a_tensor_parallel_shard_is_its_own_entry_and_no_other_shards():
    """A rank's entry reads back under its shard key only: never for the whole KV, another rank, another world."""
    kv = random_chunk(seed=9, heads=2)
    mine = kv.key.for_shard(tp_shard(2, 0, 0, 2))
    kv.key = mine
    blob = serialize(kv)
    assert json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]["shard"] == mine.shard
    assert_same_kv(read(blob, mine), kv)
    for shard in ("", tp_shard(2, 1, 2, 4), tp_shard(4, 0, 0, 2), tp_shard(2, 0, 0, 1)):
        with pytest.raises(EntryError):
            read(blob, mine.for_shard(shard))


def test_tensor_dtype_that_disagrees_with_the_metadata_is_rejected():
    bf16 = random_chunk(seed=9, dtype=torch.bfloat16)
    blob = serialize(bf16)
    relabelled = retag_tensor_dtype(blob, "F16")  # same bytes and digests, other dtype
    assert split_entry(relabelled)[1]["dtype"] == "bfloat16"
    with pytest.raises(EntryError, match="header digest"):  # the header digest covers the tensor table
        read(relabelled, bf16.key)
    with pytest.raises(EntryError, match="F16"):  # resealed by a writer without a secret: the metadata disagrees
        read(reseal(blob, *split_entry(relabelled)[:2]), bf16.key)
    fp32 = random_chunk(seed=9, dtype=torch.float32)
    with pytest.raises(EntryError):
        read(retag_tensor_dtype(serialize(fp32), "I32"), fp32.key)


def test_metadata_dtype_that_disagrees_with_the_tensors_is_rejected():
    kv = random_chunk(seed=10, dtype=torch.bfloat16)
    blob = serialize(kv)
    with pytest.raises(EntryError, match="header digest"):  # plain tampering: the header digest covers the dtype
        read(retag_metadata(blob, dtype="float16"), kv.key)
    header, meta, _ = split_entry(blob)
    forged = reseal(blob, header, {**meta, "dtype": "float16"})
    with pytest.raises(EntryError, match="BF16"):  # a consistent but lying writer: the tensor table disagrees
        read(forged, kv.key)
    with pytest.raises(EntryError, match="layout"):  # ... and so does the model
        read(forged, kv.key, expect=kv.layout)


@pytest.mark.parametrize(
    "field,value",
    [("base_position", "5"), ("base_position", "-1"), ("num_layers", "3"), ("num_layers", "x"), ("layer_digests", "["),
     ("kv_heads", "1"), ("check", "none")],
)
def test_edited_metadata_is_rejected(field, value):
    kv = random_chunk(seed=11)
    with pytest.raises(EntryError):
        read(retag_metadata(serialize(kv), **{field: value}), kv.key)


@pytest.mark.parametrize(
    "blob",
    [
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 4) + b"null",
        struct.pack("<Q", 2) + b"{}",
        struct.pack("<Q", 1 << 40) + b"{}",
        struct.pack("<Q", 3) + b"\xff\xfe{",
        b"not an entry at all",
    ],
)
def test_garbage_is_an_entry_error(blob):
    with pytest.raises(EntryError):
        read(blob, random_chunk(seed=0).key)


def _structural_edits(blob: bytes) -> dict[str, tuple[dict, dict]]:
    """Header edits that keep every byte count: a shape permuted, flattened or split, layers swapped or cut."""
    header, meta, _ = split_entry(blob)
    tokens, heads, dim = header["k.1"]["shape"]
    edits = {
        "permuted": ("k.1", [heads, tokens, dim]),
        "flattened": ("v.2", [tokens * heads * dim]),
        "split": ("k.0", [tokens, heads, 2, dim // 2]),
        "token ids reshaped": ("token_ids", [1, tokens]),
    }
    out = {}
    for name, (tensor, shape) in edits.items():
        table = json.loads(json.dumps(header))
        table[tensor]["shape"] = shape
        out[name] = (table, meta)
    swapped = json.loads(json.dumps(header))
    swapped["k.0"], swapped["k.1"] = swapped["k.1"], swapped["k.0"]
    out["layers swapped"] = (swapped, meta)
    cut = {n: i for n, i in header.items() if n not in ("k.3", "v.3")}
    digests = json.loads(meta["layer_digests"])[:3]
    out["layer count 3"] = (cut, {**meta, "num_layers": "3", "layer_digests": json.dumps(digests)})
    return out


@pytest.mark.parametrize("edit", ["permuted", "flattened", "split", "token ids reshaped", "layers swapped", "layer count 3"])
def test_structural_header_edits_are_rejected_tampered_or_resealed(edit):
    kv = random_chunk(seed=12, dtype=torch.bfloat16)
    blob = serialize(kv)
    header, meta = _structural_edits(blob)[edit]
    tampered = rebuild_entry(blob, header, {**meta, "header_digest": split_entry(blob)[1]["header_digest"]})
    with pytest.raises(EntryError):
        read(tampered, kv.key)
    resealed = reseal(blob, header, meta)  # a writer without the secret who recomputes every digest
    with pytest.raises(EntryError):
        read(resealed, kv.key, expect=kv.layout)
    if edit != "layer count 3":  # a consistent 3-layer entry is only wrong for a model of 4 layers
        with pytest.raises(EntryError):
            read(resealed, kv.key)
    with pytest.raises(EntryError):
        read(reseal(blob, header, meta, SECRET), kv.key, expect=kv.layout, secret=SECRET)


def test_entry_of_another_layout_is_rejected_for_the_model():
    kv = random_chunk(seed=13, heads=2)
    blob = serialize(kv)
    assert_same_kv(read(blob, kv.key, expect=kv.layout), kv)
    for other in (KVLayout(4, 3, 64, "bfloat16"), KVLayout(5, 2, 64, "bfloat16"), KVLayout(4, 2, 32, "bfloat16"),
                  KVLayout(4, 2, 64, "float16")):
        with pytest.raises(EntryError, match="layout"):
            read(blob, kv.key, expect=other)


def test_authenticated_entries_need_the_secret():
    kv = random_chunk(seed=14, base_position=7)
    signed = serialize(kv, SECRET)
    assert_same_kv(read(signed, kv.key, secret=SECRET, expect=kv.layout), kv)
    assert_same_kv(read(signed, kv.key, [2], secret=SECRET), kv, layers=[2])
    assert split_entry(signed)[1]["check"] == "blake3-keyed"
    with pytest.raises(EntryRefused, match="KVBLEND_STORE_SECRET"):  # a reader without the secret
        read(signed, kv.key)
    with pytest.raises(EntryRefused, match="MAC"):  # another deployment's secret
        read(signed, kv.key, secret=b"another-secret-of-enough-length")
    with pytest.raises(EntryRefused, match="not authenticated"):  # an unkeyed entry is refused once a secret is set
        read(serialize(kv), kv.key, secret=SECRET)


def test_forgeries_without_the_secret_are_refused():
    """A writer to a shared tier who lacks the secret: any value, base position or layout it forges fails the MAC."""
    kv = random_chunk(seed=15)
    signed = serialize(kv, SECRET)
    header, meta, base = split_entry(signed)
    evil = random_chunk(seed=16, token_seed=15, base_position=3)  # same key, the attacker's KV
    assert evil.key == kv.key
    evil_blob = serialize(evil)
    forgeries = [
        reseal(signed, *split_entry(evil_blob)[:2], secret=None),  # their own entry, digests recomputed
        reseal(signed, *split_entry(evil_blob)[:2], secret=b"guessed-secret-xxxxxxxxxx"),
        reseal(signed, header, {**meta, "base_position": "3"}, secret=b"guessed-secret-xxxxxxxxxx"),
        retag_metadata(signed, base_position="3"),
        signed[:base] + evil_blob[split_entry(evil_blob)[2]:],  # the signed header over other tensor bytes
    ]
    for blob in forgeries:
        with pytest.raises(EntryError):
            read(blob, kv.key, secret=SECRET)
    assert_same_kv(read(evil_blob, kv.key), evil)  # without a secret, a consistent forgery is indistinguishable


def test_secret_must_be_long_enough_and_is_never_shown():
    assert entry_secret(None) is None and entry_secret("s" * 16) == b"s" * 16
    with pytest.raises(ValueError) as info:
        entry_secret("short-secret")
    assert "short-secret" not in str(info.value)
