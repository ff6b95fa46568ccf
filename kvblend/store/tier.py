"""The interface every cache tier implements, and the counters each keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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

    def as_dict(self) -> dict:
        return asdict(self)


class Tier(Protocol):
    """A place chunk KV can live. A failing tier or a bad entry is a miss: `get` raises only for a malformed
    request (ValueError). `expect`, the model's KV layout, is what every entry read must match."""

    name: str
    max_bytes: int  # the tier's budget: beyond it, least recently used entries are evicted
    synchronous: bool  # True: cheap enough to write on the caller's thread (process memory)
    host_shared_prefetch: bool  # True: prefetch warms a cache every process of the host reads (the page cache)

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None) -> ChunkKV | None: ...

    def put(self, key: ChunkKey, kv: ChunkKV) -> bool: ...

    def contains(self, key: ChunkKey) -> bool: ...

    def delete(self, key: ChunkKey) -> None: ...

    def prefetch(self, keys: Iterable[ChunkKey]) -> None: ...

    def counters(self) -> TierStats: ...

    def stats(self) -> TierStats: ...
