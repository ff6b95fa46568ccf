"""The interface every cache tier implements, and the counters each keeps."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Protocol, Sequence

from kvblend.store.entry import ChunkKV, KVLayout
from kvblend.store.key import ChunkKey


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    corrupt: int = 0
    errors: int = 0
    entries: int = 0
    bytes: int = 0
    bytes_read: int = 0  # counted by the TieredStore over the tier (entries as the tier stores them)
    bytes_written: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class TierCounters:
    """A tier's event counters (hits, misses, ...), bumped from any thread; one copy of this logic for every tier."""

    def __init__(self) -> None:
        self._stats = TierStats()
        self._lock = threading.Lock()

    def add(self, *fields: str, n: int = 1) -> None:
        """Add `n` to each named counter."""
        with self._lock:
            for field in fields:
                setattr(self._stats, field, getattr(self._stats, field) + n)

    def snapshot(self, entries: int = 0, bytes: int = 0) -> TierStats:
        """The counters now, with the tier's own `entries` and `bytes` (counted by the tier, not here)."""
        with self._lock:
            return replace(self._stats, entries=entries, bytes=bytes)


class Tier(Protocol):
    """A place chunk KV can live. A failing tier or a bad entry is a miss: `get` raises only for a malformed
    request (ValueError). `expect`, the model's KV layout, is what every entry read must match."""

    name: str
    max_bytes: int  # the tier's budget: beyond it, least recently used entries are evicted
    synchronous: bool  # True: cheap enough to write on the caller's thread (process memory)
    host_shared_prefetch: bool  # True: prefetch warms a cache every process of the host reads (the page cache)
    codec: str  # how `put` stores KV: "full" (the model's dtype), "fp8" or "int4"; `get` may return it encoded

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None) -> ChunkKV | None: ...

    def get_many(self, keys: Sequence[ChunkKey], expect: KVLayout | None = None) -> list[ChunkKV | None]:
        """Whole entries of `keys` in order, each verified as `get` verifies it (None: miss or bad entry)."""
        ...

    def put(self, key: ChunkKey, kv: ChunkKV) -> bool: ...

    def contains(self, key: ChunkKey) -> bool: ...

    def delete(self, key: ChunkKey) -> None: ...

    def prefetch(self, keys: Iterable[ChunkKey]) -> None: ...

    def counters(self) -> TierStats: ...

    def stats(self) -> TierStats: ...
