"""Storage codecs: compressed entries are format-checked and digested like full ones, decode close to the KV
they were written from, format 3 entries still read, and a store hands out model-dtype KV whatever a tier holds."""

import pytest
import torch

from kvblend.blend.source import StoreLayerSource
from kvblend.store import DiskTier, StoreConfig, open_store
from kvblend.store.entry import CODECS, BytesSource, EntryError, read_entry, serialize
from test_store_helpers import assert_same_kv, flip, random_chunk, reseal, split_entry, tensor_span

SECRET = b"test-deployment-secret-0123456789"
# decoded error against each (token, head)'s absolute maximum: half a code step, fp8 e4m3 and int4 over 32 channels
BOUND = {"fp8": 2.0 ** -4, "int6": 0.5 / 31, "int4": 0.5 / 7}


def read(blob, kv, layers=None, secret=None):
    return read_entry(BytesSource(blob), kv.key, layers, len(blob), kv.layout, secret)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    top = want.float().abs().amax(dim=-1, keepdim=True)
    return ((got.float() - want.float()).abs() / top).max().item()


@pytest.mark.parametrize("codec", ["fp8", "int6", "int4"])
@pytest.mark.parametrize("secret", [None, SECRET])
def test_compressed_entry_round_trip(codec, secret):
    kv = random_chunk(seed=5, dtype=torch.bfloat16, base_position=3)
    blob = serialize(kv, secret, codec)
    got = read(blob, kv, secret=secret)
    assert got.codec == codec and got.layout == kv.layout and got.base_position == 3
    decoded = got.decoded()
    assert decoded.k.dtype == torch.bfloat16 and decoded.codes is None
    # bf16 output rounding adds at most 2^-8 relative to the value itself
    assert relative_error(decoded.k, kv.k) <= BOUND[codec] + 2 ** -8
    assert relative_error(decoded.v, kv.v) <= BOUND[codec] + 2 ** -8
    sliced = read(blob, kv, layers=[2], secret=secret).decoded()
    assert torch.equal(sliced.k[0], decoded.k[2]) and torch.equal(sliced.v[0], decoded.v[2])


def kv_bytes(blob: bytes) -> int:
    """Bytes of an entry's K/V tensors (codes and scales), by its tensor table."""
    header, _, _ = split_entry(blob)
    return sum(end - start for name, (start, end) in
               ((name, info["data_offsets"]) for name, info in header.items()) if name != "token_ids")


def test_compressed_entries_are_smaller():
    kv = random_chunk(seed=1, dtype=torch.bfloat16)
    size = {codec: kv_bytes(serialize(kv, None, codec)) for codec in CODECS}
    assert size["full"] == kv.k.nbytes + kv.v.nbytes
    assert size["fp8"] / size["full"] == (64 + 4) / 128  # 64 fp8 codes and an fp32 scale a token's head
    assert size["int6"] / size["full"] == (48 + 2 * 4) / 128  # 48 bytes of codes, two group scales
    assert size["int4"] / size["full"] == (32 + 2 * 4) / 128


@pytest.mark.parametrize("codec", ["fp8", "int6", "int4"])
def test_damaged_codes_or_scales_are_caught(codec):
    kv = random_chunk(seed=2, dtype=torch.bfloat16)
    blob = serialize(kv, None, codec)
    for name in ("k.1", "v_scale.3"):
        start, _ = tensor_span(blob, name)
        with pytest.raises(EntryError, match="digest mismatch"):
            read(flip(blob, start + 1), kv)
    header, meta, _ = split_entry(blob)
    with pytest.raises(EntryError, match="codec 'int2' is unknown"):
        read(reseal(blob, header, {**meta, "codec": "int2"}), kv)
    other = "int4" if codec == "fp8" else "fp8"  # relabelled: the tensor table no longer fits the codec
    with pytest.raises(EntryError, match="tensor"):
        read(reseal(blob, header, {**meta, "codec": other}), kv)


def test_format_3_entry_reads_and_a_codec_field_in_it_does_not():
    kv = random_chunk(seed=4, dtype=torch.float16)
    blob = serialize(kv)
    header, meta, _ = split_entry(blob)
    old = {name: value for name, value in meta.items() if name != "codec"}
    assert_same_kv(read(reseal(blob, header, {**old, "format_version": "3"}), kv), kv)
    with pytest.raises(EntryError, match="format 3 entry has a codec"):
        read(reseal(blob, header, {**meta, "format_version": "3"}), kv)


def test_store_hands_out_decoded_kv_and_promotes_it(tmp_path):
    kv = random_chunk(seed=6, dtype=torch.bfloat16)
    config = StoreConfig(disk_dir=str(tmp_path), disk_codec="int4", tier_order=("memory", "disk"))
    with open_store(config) as store:
        store.put(kv.key, kv)
        store.flush()
        store.tiers[0].delete(kv.key)
        raw = store.get(kv.key, layers=[1], expect=kv.layout, encoded=True)
        assert raw.codec == "int4"
        whole = store.get(kv.key, expect=kv.layout)
        assert whole.codec == "full" and whole.k.dtype == torch.bfloat16
        assert relative_error(whole.k, kv.k) <= BOUND["int4"] + 2 ** -8
        assert store.tiers[0].get(kv.key).codec == "full"  # promoted decoded into memory
        source = StoreLayerSource(store, [kv.key], "cpu", kv.layout, prefetch=False)
        store.tiers[0].delete(kv.key)
        k, v = source.wait(2)
        assert torch.equal(k, whole.k[2]) and torch.equal(v, whole.v[2])


def test_a_tier_reads_entries_of_any_codec(tmp_path):
    kv = random_chunk(seed=7, dtype=torch.bfloat16)
    DiskTier(tmp_path, 1 << 30, codec="fp8").put(kv.key, kv)
    got = DiskTier(tmp_path, 1 << 30, codec="full").get(kv.key, expect=kv.layout)
    assert got.codec == "fp8" and relative_error(got.decoded().k, kv.k) <= BOUND["fp8"] + 2 ** -8
    with pytest.raises(ValueError, match="unknown storage codec"):
        StoreConfig(redis_codec="zstd")


def test_codec_settings_reach_the_store_config(tmp_path):
    from kvblend.vllm.config import ConnectorConfig

    extra = {"store_dir": str(tmp_path), "codecs": {"redis": "fp8", "disk": "int4"}}
    config = ConnectorConfig.from_extra(extra).store_config()
    assert (config.disk_codec, config.redis_codec, config.peer_codec) == ("int4", "fp8", StoreConfig().peer_codec)
    with pytest.raises(ValueError, match="tiers with a codec"):
        StoreConfig.from_settings(codecs={"memory": "fp8"})
