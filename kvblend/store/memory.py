"""Process-memory tier: an LRU of decoded entries under a byte budget."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Iterable, Sequence

from kvblend.store.entry import ChunkKV, KVLayout, layer_request
from kvblend.store.key import ChunkKey
from kvblend.store.tier import TierCounters, TierStats

log = logging.getLogger(__name__)


class MemoryTier:
    """LRU over whole entries; a put larger than the budget is refused rather than evicting everything."""

    name = "memory"
    synchronous = True
    host_shared_prefetch = False
    codec = "full"  # decoded entries: what a read hands out without a copy

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"memory tier budget must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0
        self.counts = TierCounters()
        self._lock = threading.Lock()

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None) -> ChunkKV | None:
        """The entry (or `layers` of it) if held and, given the model's layout `expect`, of that layout."""
        wanted = layer_request(layers, expect)
        with self._lock:
            kv = self._entries.get(key.digest)
            wrong = kv is not None and expect is not None and kv.layout != expect  # not this model's: drop it
            short = kv is not None and wanted is not None and max(wanted) >= len(kv.k)
            if kv is None or wrong or short:
                self.counts.add("misses")
                if wrong or short:
                    self.counts.add("corrupt")
                    log.warning("memory tier: %s entry %s of layout %s (model %s, layers %s)",
                                "dropping" if wrong else "refusing", key.digest, kv.layout, expect, wanted)
                if wrong:
                    del self._entries[key.digest]
                    self._bytes -= kv.nbytes
                return None
            self._entries.move_to_end(key.digest)
            self.counts.add("hits")
        return kv if wanted is None else kv.select_layers(wanted)

    def get_many(self, keys: Sequence[ChunkKey], expect: KVLayout | None = None) -> list[ChunkKV | None]:
        """Whole entries of `keys` (held entries are already decoded: one `get` each)."""
        return [self.get(key, None, expect) for key in keys]

    def put(self, key: ChunkKey, kv: ChunkKV) -> bool:
        if kv.layers is not None:
            raise ValueError("memory tier stores whole entries only")
        if kv.nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key.digest, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key.digest] = kv
            self._bytes += kv.nbytes
            self.counts.add("puts")
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.counts.add("evictions")
        return True

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            return key.digest in self._entries

    def delete(self, key: ChunkKey) -> None:
        with self._lock:
            old = self._entries.pop(key.digest, None)
            if old is not None:
                self._bytes -= old.nbytes

    def prefetch(self, keys: Iterable[ChunkKey]) -> None:
        """Entries here are already resident: refresh their LRU position so they survive until used."""
        with self._lock:
            for key in keys:
                if key.digest in self._entries:
                    self._entries.move_to_end(key.digest)

    def counters(self) -> TierStats:
        """Hit/miss/put counters only (cheap: no scan of the stored entries)."""
        return self.counts.snapshot()

    def stats(self) -> TierStats:
        with self._lock:
            entries, held = len(self._entries), self._bytes
        return self.counts.snapshot(entries, held)
