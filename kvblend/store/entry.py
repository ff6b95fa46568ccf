"""A chunk's KV entry: per-layer K and V plus metadata, serialised as safetensors (never pickle).

Tensors are `token_ids`, then `k.<layer>`, `v.<layer>` of shape [tokens, kv_heads, head_dim], layer by layer,
so one layer's K and V are one byte range. An entry stored with a codec (fp8, int4: kvblend.triton_kernels.kv_codec)
holds codes in `k.<layer>`, `v.<layer>` and their fp32 scales in `k_scale.<layer>`, `v_scale.<layer>` right after
them; its `dtype` stays the model's, what a reader decodes it to. Each layer carries a BLAKE3 digest of its bytes,
so a layer-sliced read is verified without reading the rest; a header digest covers the whole header (tensor table and metadata, the
layer digests included). With a deployment secret that header digest is a keyed BLAKE3 MAC: nobody without
the secret can write an entry a reader accepts.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np
import torch

from kvblend.cpu import unpin_thread
from kvblend.store.key import WHOLE, ChunkKey
from kvblend.triton_kernels.kv_codec import code_dim, dequantize_kv, head_dim_of, quantize_kv, scale_groups

FORMAT_VERSION = "4"  # 4: a `codec` field (3: BLAKE3 layer digests, header digest or MAC, K/V per layer adjacent)
READABLE_VERSIONS = ("3", "4")  # a format 3 entry is a format 4 one of codec "full" without the field
CODECS = ("full", "fp8", "int6", "int4")  # full: the model's dtype
SECRET_ENV = "KVBLEND_STORE_SECRET"
MIN_SECRET_BYTES = 16
MAX_HEADER = 1 << 24
MAX_DIM = 1 << 16  # bound on layers, KV heads and head dim a header may claim
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # safetensors' dtype names
_CODE_DTYPES = {"fp8": (torch.float8_e4m3fn, "F8_E4M3"), "int6": (torch.uint8, "U8"), "int4": (torch.uint8, "U8")}
_UNKEYED, _KEYED = "blake3", "blake3-keyed"
_MAC_CONTEXT = "kvblend store entry header MAC, format 3"
_PARALLEL_BYTES = 1 << 22  # whole reads at least this large read and verify layers on several threads
_READ_THREADS = min(4, os.cpu_count() or 1)
_HEAP_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger blocks are always fresh mmaps


class EntryError(ValueError):
    """An entry is truncated, corrupt, forged, or does not belong to the key or model it was read for."""


class EntryRefused(EntryError):
    """An entry this reader cannot accept but another may (another deployment secret, more layers asked for
    than it holds): a miss, but a tier keeps it (a put of the same key replaces it)."""


@dataclass(frozen=True)
class KVLayout:
    """The KV geometry a model's entries have: what a reader checks every tensor against."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= MAX_DIM:
                raise ValueError(f"KVLayout {name} must be an int in 1..{MAX_DIM}, got {value!r}")
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"KVLayout dtype must be one of {sorted(_TORCH_DTYPES)}, got {self.dtype!r}")

    @property
    def token_layer_bytes(self) -> int:
        """Bytes of one token's K and V in one layer."""
        return 2 * self.kv_heads * self.head_dim * _TORCH_DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class KVCodes:
    """What an encoded entry's `k` and `v` (codes) decode with: the codec, the scales of each, the model dtype."""

    codec: str
    k_scale: torch.Tensor  # fp32 [layers, tokens, kv_heads, groups]
    v_scale: torch.Tensor
    dtype: str

    def select(self, pick) -> "KVCodes":
        return KVCodes(self.codec, self.k_scale[pick], self.v_scale[pick], self.dtype)


@dataclass
class ChunkKV:
    """K and V of one chunk for `layers` (all layers when read whole), stacked [layers, tokens, kv_heads, head_dim];
    with `codes`, k and v are a codec's codes (`decoded()` gives them in the model dtype)."""

    key: ChunkKey
    k: torch.Tensor
    v: torch.Tensor
    token_ids: torch.Tensor
    base_position: int = 0
    layers: tuple[int, ...] | None = None
    codes: KVCodes | None = None

    def __post_init__(self) -> None:
        if self.k.shape != self.v.shape or self.k.dim() != 4:
            raise ValueError(f"k and v must both be [layers, tokens, kv_heads, head_dim], got {self.k.shape} and {self.v.shape}")
        if self.codes is None and (self.k.dtype != self.v.dtype or self.k.dtype not in _DTYPE_NAMES):
            raise ValueError(f"unsupported KV dtypes {self.k.dtype}/{self.v.dtype}")
        if self.codes is not None:
            _check_codes(self.k, self.v, self.codes)
        if self.k.shape[1] != self.key.num_tokens or self.token_ids.numel() != self.key.num_tokens:
            raise ValueError(f"KV holds {self.k.shape[1]} tokens and {self.token_ids.numel()} ids; key says {self.key.num_tokens}")

    @property
    def nbytes(self) -> int:
        scales = 0 if self.codes is None else self.codes.k_scale.nbytes + self.codes.v_scale.nbytes
        return self.k.nbytes + self.v.nbytes + scales

    @property
    def codec(self) -> str:
        return "full" if self.codes is None else self.codes.codec

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.k.dtype] if self.codes is None else self.codes.dtype

    @property
    def layout(self) -> KVLayout:
        """The geometry of a whole entry (of a sliced one, its layer count is the slice's), decoded."""
        _, _, heads, width = self.k.shape
        head_dim = width if self.codes is None else head_dim_of(self.codec, width)
        return KVLayout(self.k.shape[0], heads, head_dim, self.dtype_name)

    def encoded(self, codec: str) -> "ChunkKV":
        """This chunk under `codec` (itself if already so); only a decoded entry can be encoded."""
        if codec == self.codec:
            return self
        if codec not in CODECS or self.codes is not None:
            raise ValueError(f"cannot encode a {self.codec} entry as {codec!r} (codecs: {CODECS})")
        (k, k_scale), (v, v_scale) = quantize_kv(self.k, codec), quantize_kv(self.v, codec)
        return ChunkKV(self.key, k, v, self.token_ids, self.base_position, self.layers,
                       KVCodes(codec, k_scale, v_scale, self.dtype_name))

    def decoded(self, device: torch.device | str | None = None, backend: str = "auto") -> "ChunkKV":
        """This chunk's K and V in the model dtype on `device` (None: where they are): codes move compressed and
        are decoded there (Triton on GPU, torch on CPU)."""
        if self.codes is None:
            return self if device is None else replace(self, k=self.k.to(device), v=self.v.to(device))
        moved = [t if device is None else t.to(device, non_blocking=True)
                 for t in (self.k, self.codes.k_scale, self.v, self.codes.v_scale)]
        dtype, codec = _TORCH_DTYPES[self.codes.dtype], self.codes.codec
        k, v = dequantize_kv(*moved[:2], codec, dtype, backend), dequantize_kv(*moved[2:], codec, dtype, backend)
        return ChunkKV(self.key, k, v, self.token_ids, self.base_position, self.layers)

    def select_layers(self, layers: Sequence[int]) -> "ChunkKV":
        """The same chunk restricted to `layers` (indices into this entry's layer axis)."""
        index = list(layers)
        own = self.layers or tuple(range(self.k.shape[0]))
        if index and index == list(range(index[0], index[0] + len(index))) and 0 <= index[0] and index[-1] < len(self.k):
            pick = slice(index[0], index[0] + len(index))  # a run of layers (the blend reads one): views, no copy
        else:
            pick = index
        codes = None if self.codes is None else self.codes.select(pick)
        return ChunkKV(self.key, self.k[pick], self.v[pick], self.token_ids, self.base_position,
                       tuple(own[i] for i in index), codes)


def _check_codes(k: torch.Tensor, v: torch.Tensor, codes: KVCodes) -> None:
    """Codes of `codes.codec` and scales that fit them, decoding to a model dtype."""
    if codes.codec not in _CODE_DTYPES or codes.dtype not in _TORCH_DTYPES:
        raise ValueError(f"unsupported KV codec {codes.codec!r} or dtype {codes.dtype!r}")
    want = _CODE_DTYPES[codes.codec][0]
    head_dim = head_dim_of(codes.codec, k.shape[-1])
    scales = k.shape[:3] + (scale_groups(codes.codec, head_dim),)
    if k.dtype != want or v.dtype != want:
        raise ValueError(f"{codes.codec} codes must be {want}, got {k.dtype}/{v.dtype}")
    for scale in (codes.k_scale, codes.v_scale):
        if scale.dtype != torch.float32 or tuple(scale.shape) != tuple(scales):
            raise ValueError(f"{codes.codec} scales must be float32 {tuple(scales)}, got {scale.dtype} {tuple(scale.shape)}")


def entry_secret(value: str | bytes | None) -> bytes | None:
    """A deployment secret as bytes (None: entries are hashed, not authenticated). The error never shows it."""
    if value is None:
        return None
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"the store secret ({SECRET_ENV}) must be at least {MIN_SECRET_BYTES} bytes, got {len(raw)}")
    return raw


def entry_codec(codec: str) -> str:
    """A tier's storage codec, checked (ValueError naming the choices)."""
    if codec not in CODECS:
        raise ValueError(f"unknown storage codec {codec!r}; expected one of {CODECS}")
    return codec


def _blake3(data, **options):
    """A BLAKE3 hasher (the `blake3` package of the store extra), imported on first use: kvblend.blend imports
    kvblend.store for ChunkKey and must stay importable without it."""
    from blake3 import blake3

    return blake3(data, **options)


@functools.lru_cache(maxsize=8)
def _mac_key(secret: bytes) -> bytes:
    return _blake3(secret, derive_key_context=_MAC_CONTEXT).digest()


def _header_digest(tensors: dict, meta: dict, secret: bytes | None) -> str:
    """BLAKE3 (keyed with the secret, if any) over the canonical JSON of the tensor table and every metadata
    field but the digest itself."""
    signed = {name: value for name, value in meta.items() if name != "header_digest"}
    message = json.dumps({"metadata": signed, "tensors": tensors}, sort_keys=True, separators=(",", ":")).encode()
    digest = _blake3(message) if secret is None else _blake3(message, key=_mac_key(secret))
    return digest.hexdigest()


def _layer_digest(*buffers) -> str:
    """BLAKE3 over a layer's bytes: its tensors' buffers (any buffer objects) in entry order."""
    digest = _blake3(buffers[0])
    for buf in buffers[1:]:
        digest.update(buf)
    return digest.hexdigest()


def _layer_tensors(codec: str, layout: KVLayout, num_tokens: int) -> list[tuple[str, str, torch.dtype, list[int]]]:
    """(name prefix, safetensors dtype, torch dtype, shape) of each tensor of a layer, in entry order."""
    heads, head_dim = layout.kv_heads, layout.head_dim
    if codec == "full":
        dtype = _TORCH_DTYPES[layout.dtype]
        return [(kv, _ST_DTYPES[layout.dtype], dtype, [num_tokens, heads, head_dim]) for kv in "kv"]
    if codec not in _CODE_DTYPES:
        raise EntryError(f"entry codec {codec!r} is unknown (codecs: {CODECS})")
    dtype, st_dtype = _CODE_DTYPES[codec]
    codes = [num_tokens, heads, code_dim(codec, head_dim)]
    scales = [num_tokens, heads, scale_groups(codec, head_dim)]
    return [("k", st_dtype, dtype, codes), ("v", st_dtype, dtype, codes),
            ("k_scale", "F32", torch.float32, scales), ("v_scale", "F32", torch.float32, scales)]


def _buffer(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array sharing its memory (a copy only if it is not contiguous on the CPU)."""
    return t.contiguous().cpu().view(torch.uint8).numpy().reshape(-1)


@dataclass(frozen=True)
class EntryBytes:
    """A serialised entry as the buffers it is made of (length field and header, then each tensor's bytes, views
    of the entry's own tensors): tiers write them out without joining them into one copy first."""

    parts: tuple
    nbytes: int

    def join(self) -> bytes:
        return b"".join(self.parts)


def serialize(kv: ChunkKV, secret: bytes | None = None, codec: str = "full") -> bytes:
    """safetensors bytes of a whole entry (all layers) under `codec`: metadata, layer digests, header digest or MAC."""
    return serialize_parts(kv, secret, codec).join()


def entry_parts(blob: "bytes | EntryBytes") -> tuple:
    """The buffers of a serialised entry, whichever form it was handed over in."""
    return blob.parts if isinstance(blob, EntryBytes) else (blob,)


def serialize_parts(kv: ChunkKV, secret: bytes | None = None, codec: str = "full") -> EntryBytes:
    """`serialize`'s bytes as buffers (no copy of the tensor data of a full entry; the tensors must not change
    meanwhile). A decoded entry is encoded with `codec` here; an encoded one must already be of `codec`."""
    if kv.layers is not None:
        raise ValueError("only whole entries (all layers) can be stored")
    kv = kv.encoded(codec)
    layout, key = kv.layout, kv.key
    ids = _buffer(kv.token_ids.to(torch.int64))
    # each layer is made contiguous on its own (an entry read has K, V interleaved)
    stacks = [kv.k.cpu(), kv.v.cpu()] + ([] if kv.codes is None else [kv.codes.k_scale.cpu(), kv.codes.v_scale.cpu()])
    specs = _layer_tensors(codec, layout, key.num_tokens)
    tensors = {"token_ids": {"dtype": "I64", "shape": [key.num_tokens], "data_offsets": [0, ids.nbytes]}}
    parts, digests, offset = [ids], [], ids.nbytes
    for layer in range(layout.num_layers):
        bufs = [_buffer(stack[layer]) for stack in stacks]
        for (prefix, st_dtype, _, shape), buf in zip(specs, bufs):
            tensors[f"{prefix}.{layer}"] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + buf.nbytes]}
            parts.append(buf)
            offset += buf.nbytes
        digests.append(_layer_digest(*bufs))
    meta = {
        "format_version": FORMAT_VERSION,
        "codec": codec,
        "key": key.digest,
        "fingerprint": key.fingerprint,
        "namespace": key.namespace,
        "context": key.context,
        "num_tokens": str(key.num_tokens),
        "token_ids_hash": key.tokens_hash,
        "base_position": str(kv.base_position),
        "dtype": layout.dtype,
        "num_layers": str(layout.num_layers),
        "kv_heads": str(layout.kv_heads),
        "head_dim": str(layout.head_dim),
        "layer_digests": json.dumps(digests),
        "check": _UNKEYED if secret is None else _KEYED,
    }
    if key.shard != WHOLE:  # a tensor-parallel rank's KV heads (whole entries keep the header they always had)
        meta["shard"] = key.shard
    meta["header_digest"] = _header_digest(tensors, meta, secret)
    raw = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    head = struct.pack("<Q", len(raw)) + raw
    return EntryBytes((head, *parts), len(head) + offset)


class EntrySource(Protocol):
    """Where an entry's bytes are read from: a file, a Redis value, memory."""

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length) range (shorter at the end of the entry)."""

    def read_into(self, targets: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        """Fill each target's buffers, in order, from its offset; EntryError if the entry ends first."""


class BytesSource:
    """An entry held in memory (a Redis value, a test's bytes)."""

    def __init__(self, blob: bytes) -> None:
        self.view = memoryview(blob)

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [bytes(self.view[o : o + n]) for o, n in ranges]

    def read_into(self, targets: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        for offset, buffers in targets:
            for buf in buffers:
                chunk = self.view[offset : offset + buf.nbytes]
                if len(chunk) != buf.nbytes:
                    raise EntryError(f"entry ends inside bytes {offset}..{offset + buf.nbytes}: truncated")
                np.copyto(buf, np.frombuffer(chunk, dtype=np.uint8))
                offset += buf.nbytes


class FileSource:
    """An entry in an open file: pread for ranges, preadv straight into the output tensors."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [os.pread(self.fd, n, o) for o, n in ranges]

    def read_into(self, targets: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        """One preadv per target, its buffers as the vector (a whole entry's layers: one system call)."""
        for offset, buffers in targets:
            views = [memoryview(buf).cast("B") for buf in buffers]
            total = sum(view.nbytes for view in views)
            done = 0
            while done < total:
                got = os.preadv(self.fd, _remaining(views, done), offset + done)
                if got == 0:
                    raise EntryError(f"entry ends inside bytes {offset}..{offset + total}: truncated")
                done += got


def _remaining(views: list[memoryview], done: int) -> list[memoryview]:
    """The part of the buffer vector `views` after its first `done` bytes."""
    for i, view in enumerate(views):
        if done < view.nbytes:
            return [view[done:], *views[i + 1 :]]
        done -= view.nbytes
    return []


@dataclass(frozen=True)
class _Header:
    """What a verified header says: the layout, codec, base position, layer digests, tensor spans and entry size."""

    layout: KVLayout
    codec: str
    base_position: int
    digests: list[str]
    spans: dict[str, tuple[int, int]]  # absolute [start, end) of every tensor
    size: int  # the entry's length in bytes, by its header


def read_entry(source: EntrySource, key: ChunkKey, layers: Sequence[int] | None = None, size: int | None = None,
               expect: KVLayout | None = None, secret: bytes | None = None, parallel: bool = True) -> ChunkKV:
    """Parse and verify an entry (or only `layers` of it); EntryError if it is bad, OSError if the source fails.

    `expect` is the model's layout: every tensor's dtype and shape must match it and the key. Layer requests
    that are wrong whatever the entry holds (empty, negative, beyond `expect`) are the caller's ValueError.
    `parallel`: a large whole entry is read and verified on `read_pool()`'s threads (False: on this one).
    """
    wanted = layer_request(layers, expect)
    try:
        header = _read_header(source, key, expect, secret)
        if size is not None and size != header.size:
            raise EntryError(f"entry is {size} bytes but its header says {header.size}: truncated or overwritten")
        if wanted is None:
            wanted = list(range(header.layout.num_layers))
        elif max(wanted) >= header.layout.num_layers:
            raise EntryRefused(f"layers {wanted} asked of an entry of {header.layout.num_layers} layers")
        return _read_tensors(source, key, header, wanted, sliced=layers is not None, parallel=parallel)
    except (EntryError, OSError):
        raise
    except Exception as exc:  # whatever else a damaged entry provokes is a bad entry, never a crash
        raise EntryError(f"malformed entry: {exc!r}") from exc


def layer_request(layers: Sequence[int] | None, expect: KVLayout | None) -> list[int] | None:
    """The layers asked for (None: all); ValueError for a request that is wrong whatever an entry holds."""
    if layers is None:
        return None
    wanted = list(layers)
    limit = expect.num_layers if expect is not None else MAX_DIM
    if not wanted or any(type(layer) is not int or not 0 <= layer < limit for layer in wanted):
        raise ValueError(f"layers {wanted} out of range for a model of {limit} layers")
    return wanted


def _read_header(source: EntrySource, key: ChunkKey, expect: KVLayout | None, secret: bytes | None) -> _Header:
    """The entry's header, verified (digest or MAC first, then key, layout and tensor table)."""
    (head,) = source.read([(0, 8)])
    if len(head) != 8:
        raise EntryError("entry shorter than its header length field")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER:
        raise EntryError(f"implausible header length {header_len}")
    (raw,) = source.read([(8, header_len)])
    if len(raw) != header_len:
        raise EntryError(f"entry ends inside its {header_len}-byte header")
    tensors = json.loads(raw)
    if not isinstance(tensors, dict) or not isinstance(tensors.get("__metadata__"), dict):
        raise EntryError("entry header is not a safetensors table with metadata")
    meta = tensors.pop("__metadata__")
    if not all(isinstance(value, str) for value in meta.values()):
        raise EntryError("entry metadata values must all be strings")
    _check_digest(tensors, meta, secret)
    _check_key(meta, key)
    layout = KVLayout(_int(meta, "num_layers"), _int(meta, "kv_heads"), _int(meta, "head_dim"), meta.get("dtype"))
    if expect is not None and layout != expect:
        raise EntryError(f"entry layout {layout} is not the model's {expect}")
    digests = json.loads(meta["layer_digests"])
    if not isinstance(digests, list) or len(digests) != layout.num_layers or not all(isinstance(d, str) for d in digests):
        raise EntryError(f"entry has {layout.num_layers} layers but layer digests {meta['layer_digests'][:80]!r}")
    base_position = _int(meta, "base_position", low=0, high=None)
    codec = meta.get("codec", "full")
    spans = _check_table(tensors, _layer_tensors(codec, layout, key.num_tokens), layout, key.num_tokens, 8 + header_len)
    return _Header(layout, codec, base_position, digests, spans, max(end for _, end in spans.values()))


def _check_digest(tensors: dict, meta: dict, secret: bytes | None) -> None:
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise EntryError(f"entry format {meta.get('format_version')!r}, expected one of {READABLE_VERSIONS}")
    if (meta["format_version"] == "4") != ("codec" in meta):
        raise EntryError(f"a format {meta['format_version']} entry {'lacks' if 'codec' not in meta else 'has'} a codec field")
    check = meta.get("check")
    if check == _KEYED and secret is None:
        raise EntryRefused(f"entry is authenticated with a deployment secret; set {SECRET_ENV} to read it")
    if check == _UNKEYED and secret is not None:
        raise EntryRefused("entry is not authenticated and this reader requires authenticated entries")
    if check not in (_UNKEYED, _KEYED):
        raise EntryError(f"entry check {check!r} is unknown")
    if not hmac.compare_digest(_header_digest(tensors, meta, secret), meta.get("header_digest", "")):
        if secret is not None:  # forged, damaged, or written under another secret: which one, nobody can tell
            raise EntryRefused("entry MAC does not verify with this deployment's secret")
        raise EntryError("entry header digest does not match its tensor table and metadata")


def _check_key(meta: dict, key: ChunkKey) -> None:
    """The entry must belong to exactly this key (model, namespace, context, tokens, shard of KV heads)."""
    expected = {
        "key": key.digest,
        "fingerprint": key.fingerprint,
        "namespace": key.namespace,
        "context": key.context,
        "num_tokens": str(key.num_tokens),
        "token_ids_hash": key.tokens_hash,
        "shard": key.shard,
    }
    for field, value in expected.items():
        if meta.get(field, WHOLE if field == "shard" else None) != value:
            raise EntryError(f"entry {field} is {meta.get(field)!r}, expected {value!r}")


def _int(meta: dict, field: str, low: int = 1, high: int | None = MAX_DIM) -> int:
    text = meta.get(field)
    if not isinstance(text, str) or not text.isdigit() or text != str(int(text)):
        raise EntryError(f"entry {field} is {text!r}, not a plain integer")
    value = int(text)
    if value < low or (high is not None and value > high):
        raise EntryError(f"entry {field} {value} is out of range")
    return value


def _check_table(tensors: dict, specs: list, layout: KVLayout, num_tokens: int,
                 data_start: int) -> dict[str, tuple[int, int]]:
    """Exactly token_ids and every layer's tensors (`specs`: its codec's), each of the dtype and shape the key and
    layout imply, tiling the data without gaps or overlaps: the absolute span of each."""
    want = {"token_ids": ("I64", [num_tokens], num_tokens * 8)}
    for layer in range(layout.num_layers):
        for prefix, st_dtype, dtype, shape in specs:
            want[f"{prefix}.{layer}"] = (st_dtype, shape, int(np.prod(shape)) * dtype.itemsize)
    if set(tensors) != set(want):
        extra, missing = sorted(set(tensors) - set(want))[:4], sorted(set(want) - set(tensors))[:4]
        raise EntryError(f"entry tensors do not match its layout: unexpected {extra}, missing {missing}")
    spans = {}
    for name, (dtype, tensor_shape, nbytes) in want.items():
        info = tensors[name]
        if not isinstance(info, dict) or info.get("dtype") != dtype or info.get("shape") != tensor_shape:
            raise EntryError(f"tensor {name} is {info!r}; expected {dtype} {tensor_shape}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] and offsets[1] - offsets[0] == nbytes):
            raise EntryError(f"tensor {name} has data offsets {offsets!r} for {nbytes} bytes")
        spans[name] = (data_start + offsets[0], data_start + offsets[1])
    position = data_start
    for start, end in sorted(spans.values()):
        if start != position:
            raise EntryError(f"entry tensors leave a gap or overlap at byte {position}")
        position = end
    return spans


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised output tensor. Below glibc's largest mmap threshold (32 MiB) torch.empty, whose freed
    memory the heap hands out again (no fresh page faults for a span evicted and another read); above it
    numpy-allocated memory, which numpy asks Linux to back with huge pages (first touch of a fresh 64 MiB entry
    several times cheaper than torch.empty's 4 KiB pages)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < _HEAP_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


@functools.lru_cache(maxsize=1)
def read_pool() -> ThreadPoolExecutor:
    """Threads that read and verify entries (preadv, copies and BLAKE3 release the GIL). A task running here must
    not wait on another task of this pool: reads submitted from it run serially (`parallel=False`)."""
    return ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="kvblend-entry", initializer=unpin_thread)


def _coalesced(targets: list[tuple[int, list[np.ndarray]]]) -> list[tuple[int, list[np.ndarray]]]:
    """`targets` with each one that starts where the previous ends merged into it: one read per byte run."""
    merged: list[tuple[int, list[np.ndarray]]] = []
    end = None
    for offset, buffers in targets:
        if merged and offset == end:
            merged[-1][1].extend(buffers)
        else:
            merged.append((offset, list(buffers)))
            end = offset
        end += sum(buf.nbytes for buf in buffers)
    return merged


def _read_tensors(source: EntrySource, key: ChunkKey, header: _Header, wanted: list[int], sliced: bool,
                  parallel: bool) -> ChunkKV:
    """Read token ids and the `wanted` layers' tensors straight into the output tensors, and verify them.

    A layer's tensors share one row of a [layers, layer bytes] allocation, laid out as in the entry (K then V,
    then their scales if encoded; each tensor a view of its bytes): a layer is one run of bytes, so a whole entry
    is one vectored read and a layer's digest is one BLAKE3 pass over its run."""
    specs = _layer_tensors(header.codec, header.layout, key.num_tokens)
    sizes = [int(np.prod(shape)) * dtype.itemsize for _, _, dtype, shape in specs]
    rows = _empty((len(wanted), sum(sizes)), torch.uint8)
    views, start = [], 0
    for (_, _, dtype, shape), size in zip(specs, sizes):
        views.append(rows[:, start : start + size].view(dtype).view(len(wanted), *shape))
        start += size
    token_ids = torch.empty(key.num_tokens, dtype=torch.int64)
    ids = _buffer(token_ids)
    source.read_into([(header.spans["token_ids"][0], [ids])])
    if hashlib.sha256(ids).hexdigest() != key.tokens_hash:
        raise EntryError("stored token ids do not match the key's token ids hash")

    def targets(i: int, layer: int) -> list[tuple[int, list[np.ndarray]]]:
        spans = [header.spans[f"{prefix}.{layer}"] for prefix, *_ in specs]
        if all(spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1)):
            return [(spans[0][0], [_buffer(rows[i])])]
        return [(span[0], [_buffer(view[i])]) for span, view in zip(spans, views)]

    def verify(i: int, layer: int) -> None:
        if not hmac.compare_digest(_layer_digest(_buffer(rows[i])), header.digests[layer]):
            raise EntryError(f"digest mismatch in layer {layer}")

    def read_and_verify(items: list[tuple[int, int]]) -> None:
        source.read_into(_coalesced([t for item in items for t in targets(*item)]))
        for item in items:
            verify(*item)

    items = list(enumerate(wanted))
    workers = min(_READ_THREADS, len(items))
    if parallel and not sliced and rows.nbytes >= _PARALLEL_BYTES and workers > 1:  # a run of layers per thread
        runs = [items[w * len(items) // workers : (w + 1) * len(items) // workers] for w in range(workers)]
        list(read_pool().map(read_and_verify, runs))
    else:
        read_and_verify(items)  # one batch: one vectored read, one Redis round trip for a sliced read
    codes = None if header.codec == "full" else KVCodes(header.codec, views[2], views[3], header.layout.dtype)
    return ChunkKV(key=key, k=views[0], v=views[1], token_ids=token_ids, base_position=header.base_position,
                   layers=tuple(wanted) if sliced else None, codes=codes)
