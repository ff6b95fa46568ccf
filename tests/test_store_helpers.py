"""Helpers shared by the chunk KV store tests (no tests here): random chunks, bit-exact comparison, entry
layout, byte surgery on serialised entries, and running Python in a fresh process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import time

import torch

from kvblend.store import DiskTier
from kvblend.store.entry import ChunkKV, _header_digest
from kvblend.store.key import ChunkKey

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FINGERPRINT = "test-model-fingerprint-0001"
SHAPE = dict(layers=4, tokens=17, heads=3, head_dim=64)


class SlowDisk(DiskTier):
    """A real disk tier whose every read first waits `delay_s` (a slow network filesystem, say)."""

    def __init__(self, root, delay_s: float) -> None:
        super().__init__(root, 1 << 30)
        self.delay_s = delay_s

    def _get(self, key, layers, expect, parallel):  # every read: one entry's, or each of a batch's
        time.sleep(self.delay_s)
        return super()._get(key, layers, expect, parallel)


def random_chunk(
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    layers: int = SHAPE["layers"],
    tokens: int = SHAPE["tokens"],
    heads: int = SHAPE["heads"],
    head_dim: int = SHAPE["head_dim"],
    fingerprint: str = FINGERPRINT,
    namespace: str = "default",
    context: str = "alone",
    base_position: int = 0,
    token_seed: int | None = None,
) -> ChunkKV:
    """A chunk of random (never zero) K and V; `token_seed` picks the token ids (default: `seed`)."""
    id_gen = torch.Generator().manual_seed(1000 + (seed if token_seed is None else token_seed))
    ids = torch.randint(0, 49152, (tokens,), generator=id_gen)
    g = torch.Generator().manual_seed(seed)
    shape = (layers, tokens, heads, head_dim)
    k = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    v = (torch.randn(shape, generator=g) * 3 - 0.5).to(dtype)
    key = ChunkKey.for_tokens(fingerprint, ids.tolist(), namespace, context)
    return ChunkKV(key, k, v, ids, base_position)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes (compare these: bit-exact, NaN-safe)."""
    return t.contiguous().view(torch.uint8)


def assert_same_kv(got: ChunkKV | None, want: ChunkKV, layers: list[int] | None = None) -> None:
    """`got` is `want` (or exactly its `layers`), bit for bit, with the same dtype, ids and base position."""
    assert got is not None, "expected a hit"
    assert got.key == want.key
    idx = list(range(want.k.shape[0])) if layers is None else list(layers)
    assert got.k.dtype == want.k.dtype and got.v.dtype == want.v.dtype
    assert tuple(got.k.shape) == (len(idx), *want.k.shape[1:])
    assert torch.equal(bits(got.k), bits(want.k[idx])), "K differs"
    assert torch.equal(bits(got.v), bits(want.v[idx])), "V differs"
    assert torch.equal(got.token_ids, want.token_ids.to(torch.int64))
    assert got.base_position == want.base_position
    assert got.layers == (None if layers is None else tuple(layers))


def split_entry(blob: bytes) -> tuple[dict, dict, int]:
    """(tensor table, metadata, data start) of a serialised entry."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__")
    return header, meta, 8 + n


def tensor_span(blob: bytes, name: str) -> tuple[int, int]:
    """Absolute [start, end) of tensor `name` (e.g. "k.2", "token_ids") in the serialised entry."""
    header, _, base = split_entry(blob)
    start, end = header[name]["data_offsets"]
    return base + start, base + end


def rebuild_entry(blob: bytes, header: dict, meta: dict, data: bytes | None = None) -> bytes:
    """The same tensor bytes (or `data`) under an edited header (re-padded to 8 bytes, as safetensors writes it)."""
    _, _, base = split_entry(blob)
    raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + (blob[base:] if data is None else data)


def reseal(blob: bytes, header: dict, meta: dict, secret: bytes | None = None, data: bytes | None = None) -> bytes:
    """A forger's entry: `header` and `meta` (and `data`, default the original tensor bytes) with the header
    digest recomputed, keyed with `secret` if the forger has it."""
    meta = {**meta, "check": "blake3" if secret is None else "blake3-keyed"}
    meta["header_digest"] = _header_digest(header, meta, secret)
    return rebuild_entry(blob, header, meta, data)


def retag_tensor_dtype(blob: bytes, new: str) -> bytes:
    """Relabel every K/V tensor as safetensors dtype `new` (same width, e.g. BF16 -> F16); metadata untouched."""
    header, meta, _ = split_entry(blob)
    for name, info in header.items():
        if name != "token_ids":
            info["dtype"] = new
    return rebuild_entry(blob, header, meta)


def retag_metadata(blob: bytes, **fields: str) -> bytes:
    """Edit metadata fields, leaving the checksums as written (so the edit is tampering)."""
    header, meta, _ = split_entry(blob)
    meta.update(fields)
    return rebuild_entry(blob, header, meta)


def flip(blob: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(blob)
    out[offset] ^= mask
    return bytes(out)


def flip_file_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """Flip bits of one byte of a file in place."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        (byte,) = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte ^ mask]))


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # several processes share 2 cores: no spinning thread pools
    return env


def run_python(code: str, *args: str, timeout: float = 120, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter (this repo and tests/ importable); its stdout, or fail with stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env or python_env()
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout


def popen_python(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or python_env(),
    )
