"""The safetensors entry: bit-exact round trip, metadata, layer-sliced reads, and every kind of damage detected."""

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from kvblend.store.entry import FORMAT_VERSION, EntryError, _payload_checksum, bytes_reader, read_entry, serialize
from kvblend.store.key import ChunkKey
from test_store_helpers import (
    assert_same_kv,
    flip,
    random_chunk,
    retag_metadata,
    retag_tensor_dtype,
    split_entry,
    tensor_span,
)


def read(blob: bytes, key: ChunkKey, layers=None, sized: bool = True):
    return read_entry(bytes_reader(blob), key, layers, size=len(blob) if sized else None)


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
    assert len(meta["payload_checksum"]) == 64
    assert b"\x80\x04" not in blob[:16]  # not a pickle stream


def test_sliced_read_fetches_only_the_requested_tensors():
    kv = random_chunk(seed=2, dtype=torch.float32, layers=8, tokens=64)
    blob = serialize(kv)
    ranges = []

    def recording_reader(wanted):
        ranges.extend(wanted)
        return bytes_reader(blob)(wanted)

    got = read_entry(recording_reader, kv.key, [5, 1])
    assert_same_kv(got, kv, layers=[5, 1])
    _, _, base = split_entry(blob)
    allowed = [(0, 8), (8, base - 8)] + [
        (start, end - start) for start, end in (tensor_span(blob, n) for n in ("token_ids", "k.5", "v.5", "k.1", "v.1"))
    ]
    assert sorted(ranges) == sorted(allowed)
    assert sum(n for _, n in ranges) < len(blob) / 3


def test_bad_layer_requests_are_the_callers_error_not_a_bad_entry():
    kv = random_chunk(seed=2)
    blob = serialize(kv)
    for layers in ([4], [-1], [0, 9], []):
        with pytest.raises(ValueError) as info:
            read(blob, kv.key, layers)
        assert not isinstance(info.value, EntryError)


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


def test_tensor_dtype_that_disagrees_with_the_metadata_is_rejected():
    bf16 = random_chunk(seed=9, dtype=torch.bfloat16)
    relabelled = retag_tensor_dtype(serialize(bf16), "F16")  # same bytes and checksums, other dtype
    assert split_entry(relabelled)[1]["dtype"] == "bfloat16"
    with pytest.raises(EntryError, match="dtype"):
        read(relabelled, bf16.key)
    fp32 = random_chunk(seed=9, dtype=torch.float32)
    with pytest.raises(EntryError):
        read(retag_tensor_dtype(serialize(fp32), "I32"), fp32.key)


def test_metadata_dtype_that_disagrees_with_the_tensors_is_rejected():
    kv = random_chunk(seed=10, dtype=torch.bfloat16)
    blob = serialize(kv)
    with pytest.raises(EntryError):  # plain tampering: the payload checksum covers the dtype
        read(retag_metadata(blob, dtype="float16"), kv.key)
    _, meta, _ = split_entry(blob)
    checksum = _payload_checksum(json.loads(meta["layer_checksums"]), meta["base_position"], "float16", meta["num_layers"])
    with pytest.raises(EntryError, match="dtype"):  # a consistent but lying writer: the tensors themselves disagree
        read(retag_metadata(blob, dtype="float16", payload_checksum=checksum), kv.key)


@pytest.mark.parametrize(
    "field,value", [("base_position", "5"), ("base_position", "-1"), ("num_layers", "3"), ("num_layers", "x"), ("layer_checksums", "[")]
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
