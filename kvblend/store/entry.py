"""A chunk's KV entry: per-layer K and V plus metadata, serialised as safetensors (never pickle).

Tensors are `k.<layer>` and `v.<layer>` of shape [tokens, kv_heads, head_dim] plus `token_ids`. Each layer
carries its own checksum so a layer-sliced read (a few byte ranges) is verified without reading the rest.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save

from kvblend.store.key import ChunkKey

FORMAT_VERSION = "2"  # 2: the payload checksum also covers base position, dtype and layer count
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
MAX_HEADER = 1 << 24
# What a damaged header or tensor table raises while it is parsed; read_entry reports all of them as EntryError.
_MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError)

# read_ranges([(offset, length), ...]) -> the bytes of each range, from a file, a Redis value or memory.
RangeReader = Callable[[Sequence[tuple[int, int]]], list[bytes]]


class EntryError(ValueError):
    """An entry is truncated, corrupt, or does not belong to the key or model it was read for."""


@dataclass
class ChunkKV:
    """K and V of one chunk for `layers` (all layers when read whole), stacked [layers, tokens, kv_heads, head_dim]."""

    key: ChunkKey
    k: torch.Tensor
    v: torch.Tensor
    token_ids: torch.Tensor
    base_position: int = 0
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.k.shape != self.v.shape or self.k.dim() != 4:
            raise ValueError(f"k and v must both be [layers, tokens, kv_heads, head_dim], got {self.k.shape} and {self.v.shape}")
        if self.k.dtype != self.v.dtype or self.k.dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported KV dtypes {self.k.dtype}/{self.v.dtype}")
        if self.k.shape[1] != self.key.num_tokens or self.token_ids.numel() != self.key.num_tokens:
            raise ValueError(f"KV holds {self.k.shape[1]} tokens and {self.token_ids.numel()} ids; key says {self.key.num_tokens}")

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.k.dtype]

    def select_layers(self, layers: Sequence[int]) -> "ChunkKV":
        """The same chunk restricted to `layers` (indices into this entry's layer axis)."""
        index = list(layers)
        own = self.layers or tuple(range(self.k.shape[0]))
        if index and index == list(range(index[0], index[0] + len(index))) and 0 <= index[0] and index[-1] < len(self.k):
            pick = slice(index[0], index[0] + len(index))  # a run of layers (the blend reads one): views, no copy
        else:
            pick = index
        return ChunkKV(self.key, self.k[pick], self.v[pick], self.token_ids, self.base_position, tuple(own[i] for i in index))


def _layer_checksum(k, v) -> str:
    """blake2b-128 over a layer's K bytes then V bytes (any buffer objects)."""
    digest = hashlib.blake2b(k, digest_size=16)
    digest.update(v)
    return digest.hexdigest()


def _payload_checksum(checksums: Sequence[str], base_position: str, dtype: str, num_layers: str) -> str:
    """sha256 over the layer checksums and the metadata the key does not pin (base position, dtype, layers)."""
    return hashlib.sha256("\0".join([*checksums, base_position, dtype, num_layers]).encode()).hexdigest()


def _buffer(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array, without a copy when it is contiguous on the CPU."""
    return t.contiguous().cpu().view(torch.uint8).numpy()


def serialize(kv: ChunkKV) -> bytes:
    """safetensors bytes of a whole entry (all layers), with metadata and per-layer checksums."""
    if kv.layers is not None:
        raise ValueError("only whole entries (all layers) can be stored")
    tensors: dict[str, torch.Tensor] = {"token_ids": kv.token_ids.to(torch.int64).contiguous().cpu()}
    checksums = []
    for layer in range(kv.k.shape[0]):
        k, v = kv.k[layer].contiguous().cpu(), kv.v[layer].contiguous().cpu()
        tensors[f"k.{layer}"], tensors[f"v.{layer}"] = k, v
        checksums.append(_layer_checksum(_buffer(k), _buffer(v)))
    key = kv.key
    metadata = {
        "format_version": FORMAT_VERSION,
        "key": key.digest,
        "fingerprint": key.fingerprint,
        "namespace": key.namespace,
        "context": key.context,
        "num_tokens": str(key.num_tokens),
        "token_ids_hash": key.tokens_hash,
        "base_position": str(kv.base_position),
        "dtype": kv.dtype_name,
        "num_layers": str(kv.k.shape[0]),
        "layer_checksums": json.dumps(checksums),
    }
    metadata["payload_checksum"] = _payload_checksum(
        checksums, metadata["base_position"], metadata["dtype"], metadata["num_layers"]
    )
    return save(tensors, metadata=metadata)


def bytes_reader(blob: bytes) -> RangeReader:
    view = memoryview(blob)

    def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [bytes(view[o : o + n]) for o, n in ranges]

    return read


def _decode(raw: bytes, dtype: str, shape: list[int], name: str) -> torch.Tensor:
    if dtype not in _ST_DTYPES:
        raise EntryError(f"tensor {name} has unsupported dtype {dtype}")
    torch_dtype = _ST_DTYPES[dtype]
    expected = int(np.prod(shape)) * torch_dtype.itemsize
    if len(raw) != expected:
        raise EntryError(f"tensor {name} is truncated ({len(raw)} of {expected} bytes)")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(torch_dtype).reshape(shape)


def read_entry(read_ranges: RangeReader, key: ChunkKey, layers: Sequence[int] | None = None, size: int | None = None) -> ChunkKV:
    """Parse and verify an entry (or only `layers` of it) through a range reader; raise EntryError if bad.

    Asking for layers the entry does not have is the caller's mistake (ValueError), not a bad entry.
    """
    header, meta, base = _read_header(read_ranges, key)
    num_layers = int(meta["num_layers"])
    wanted = list(range(num_layers)) if layers is None else list(layers)
    if not wanted or any(not 0 <= layer < num_layers for layer in wanted):
        raise ValueError(f"layers {wanted} out of range for an entry of {num_layers} layers")
    try:
        return _read_tensors(read_ranges, key, header, meta, base, wanted, layers is not None, size)
    except EntryError:
        raise
    except _MALFORMED as exc:
        raise EntryError(f"malformed entry tensors: {exc!r}") from exc


def _read_header(read_ranges: RangeReader, key: ChunkKey) -> tuple[dict, dict, int]:
    """The entry's tensor table, its metadata (verified against `key`) and the offset its data starts at."""
    try:
        (head,) = read_ranges([(0, 8)])
        if len(head) != 8:
            raise EntryError("entry shorter than its header length field")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER:
            raise EntryError(f"implausible header length {header_len}")
        (raw_header,) = read_ranges([(8, header_len)])
        header = json.loads(raw_header)
        meta = header.pop("__metadata__", None) or {}
        _check_metadata(meta, key)
    except EntryError:
        raise
    except _MALFORMED as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise EntryError(f"unreadable entry header: {exc!r}") from exc
    return header, meta, 8 + header_len


def _read_tensors(read_ranges: RangeReader, key: ChunkKey, header: dict, meta: dict, base: int,
                  wanted: list[int], sliced: bool, size: int | None) -> ChunkKV:
    """Read token ids and the `wanted` layers' K and V, verify their checksums, and decode them."""
    names = ["token_ids"] + [f"{kv}.{layer}" for layer in wanted for kv in "kv"]
    try:
        infos = [header[name] for name in names]
        offsets = [(base + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0]) for info in infos]
    except (KeyError, TypeError, IndexError) as exc:
        raise EntryError(f"entry header lacks tensor info: {exc}") from exc
    if size is not None:  # checked for every read, so a sliced read also catches a truncated entry
        end = base + max(info["data_offsets"][1] for info in header.values())
        if end != size:
            raise EntryError(f"entry is {size} bytes but its header says {end}: truncated or overwritten")
    blobs = dict(zip(names, read_ranges(offsets)))
    if hashlib.sha256(blobs["token_ids"]).hexdigest() != key.tokens_hash:
        raise EntryError("stored token ids do not match the key's token ids hash")
    checksums = json.loads(meta["layer_checksums"])
    for layer in wanted:
        if _layer_checksum(blobs[f"k.{layer}"], blobs[f"v.{layer}"]) != checksums[layer]:
            raise EntryError(f"checksum mismatch in layer {layer}")
    tensors = {name: _decode(blobs[name], info["dtype"], info["shape"], name) for name, info in zip(names, infos)}
    k = torch.stack([tensors[f"k.{layer}"] for layer in wanted])
    v = torch.stack([tensors[f"v.{layer}"] for layer in wanted])
    if _DTYPE_NAMES.get(k.dtype) != meta["dtype"] or k.dtype != v.dtype:
        raise EntryError(f"entry says dtype {meta['dtype']} but holds {k.dtype}/{v.dtype}")
    if k.shape[1] != key.num_tokens:
        raise EntryError(f"entry holds {k.shape[1]} tokens, key says {key.num_tokens}")
    return ChunkKV(
        key=key,
        k=k,
        v=v,
        token_ids=tensors["token_ids"],
        base_position=int(meta["base_position"]),
        layers=tuple(wanted) if sliced else None,
    )


def _check_metadata(meta: dict, key: ChunkKey) -> None:
    """The entry must be this format and belong to exactly this key (model, namespace, context, tokens)."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise EntryError(f"entry format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    expected = {
        "key": key.digest,
        "fingerprint": key.fingerprint,
        "namespace": key.namespace,
        "context": key.context,
        "num_tokens": str(key.num_tokens),
        "token_ids_hash": key.tokens_hash,
    }
    for field, value in expected.items():
        if meta.get(field) != value:
            raise EntryError(f"entry {field} is {meta.get(field)!r}, expected {value!r}")
    for field in ("dtype", "num_layers", "layer_checksums", "base_position"):
        if field not in meta:
            raise EntryError(f"entry metadata lacks {field!r}")
    checksums = json.loads(meta["layer_checksums"])
    if len(checksums) != int(meta["num_layers"]) or int(meta["base_position"]) < 0:
        raise EntryError(
            f"inconsistent metadata: {meta['num_layers']} layers, {len(checksums)} checksums, base {meta['base_position']}"
        )
    expected_checksum = _payload_checksum(checksums, meta["base_position"], meta["dtype"], meta["num_layers"])
    if expected_checksum != meta.get("payload_checksum"):
        raise EntryError("payload checksum does not match the layer checksums and metadata")
