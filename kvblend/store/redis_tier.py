"""Redis tier: entries shared by hosts, one value per key, layer-sliced reads through GETRANGE.

When the server is down or slow, every call reports a miss (or a failed put), the outage is logged once, and
the tier stays quiet for `retry_s` before trying the server again, so queries never wait on a dead server.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence
from urllib.parse import urlparse

from kvblend.store.entry import ChunkKV, EntryError, bytes_reader, read_entry, serialize
from kvblend.store.key import ChunkKey
from kvblend.store.tier import TierStats

log = logging.getLogger(__name__)


DEFAULT_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class RedisConfig:
    url: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry_s: float = 5.0
    prefix: str = "kvblend:"
    ttl_s: int | None = None
    readahead_entries: int = 16

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"Redis URL must look like redis://host:port/db, got {self.url!r}")
        if self.timeout_s <= 0 or self.retry_s < 0:
            raise ValueError("Redis timeout must be positive and retry interval non-negative")


class RedisTier:
    name = "redis"
    synchronous = False

    def __init__(self, config: RedisConfig | str) -> None:
        import redis

        self.config = RedisConfig(config) if isinstance(config, str) else config
        self._errors = (redis.exceptions.RedisError, OSError)
        self.client = redis.Redis.from_url(
            self.config.url, socket_timeout=self.config.timeout_s, socket_connect_timeout=self.config.timeout_s
        )
        self._down_until = 0.0
        self._stats = TierStats()
        self._lock = threading.Lock()
        self._readahead: OrderedDict[str, bytes] = OrderedDict()

    def _name(self, key: ChunkKey) -> str:
        return self.config.prefix + key.digest

    def call(self, what: str, fn, default):
        """Run a Redis command; on failure log the outage once, count it, and return `default`."""
        if time.monotonic() < self._down_until:
            return default
        try:
            result = fn()
        except self._errors as exc:
            with self._lock:
                self._stats.errors += 1
                first = self._down_until == 0.0
                self._down_until = time.monotonic() + self.config.retry_s
            if first:
                log.warning("redis tier %s unavailable during %s (%s); reporting misses, retrying every %.1fs",
                            self.config.url, what, exc, self.config.retry_s)
            return default
        if self._down_until:
            log.warning("redis tier %s is reachable again", self.config.url)
            self._down_until = 0.0
        return result

    @property
    def available(self) -> bool:
        return self.call("ping", self.client.ping, False)

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None) -> ChunkKV | None:
        name = self._name(key)
        with self._lock:
            blob = self._readahead.pop(name, None)
        try:
            if blob is not None:
                kv = read_entry(bytes_reader(blob), key, layers, size=len(blob))
            elif layers is None:
                blob = self.call("get", lambda: self.client.get(name), None)
                kv = None if blob is None else read_entry(bytes_reader(blob), key, None, size=len(blob))
            else:
                kv = self._read_layers(name, key, layers)
        except EntryError as exc:
            log.warning("redis tier: dropping bad entry %s: %s", key.digest, exc)
            self._count("corrupt")
            self.delete(key)
            kv = None
        self._count("hits" if kv is not None else "misses")
        return kv

    def _read_layers(self, name: str, key: ChunkKey, layers: Sequence[int]) -> ChunkKV | None:
        """Layer-sliced read: header first, then the wanted tensors in one pipelined GETRANGE batch."""
        failed = object()

        def read(ranges):
            def run():
                pipe = self.client.pipeline(transaction=False)
                for offset, length in ranges:
                    pipe.getrange(name, offset, offset + length - 1)
                return pipe.execute()

            out = self.call("getrange", run, failed)
            if out is failed:
                raise ConnectionError("redis unavailable")
            return out

        try:
            size = self.call("strlen", lambda: self.client.strlen(name), 0)  # 0: no such key
            if not size:
                return None
            return read_entry(read, key, layers, size=size)
        except ConnectionError:
            return None

    def put(self, key: ChunkKey, kv: ChunkKV) -> bool:
        return self.put_bytes(key, serialize(kv))

    def put_bytes(self, key: ChunkKey, blob: bytes) -> bool:
        ok = self.call("set", lambda: self.client.set(self._name(key), blob, ex=self.config.ttl_s), False)
        if ok:
            self._count("puts")
        return bool(ok)

    def contains(self, key: ChunkKey) -> bool:
        return bool(self.call("exists", lambda: self.client.exists(self._name(key)), 0))

    def delete(self, key: ChunkKey) -> None:
        with self._lock:
            self._readahead.pop(self._name(key), None)
        self.call("delete", lambda: self.client.delete(self._name(key)), 0)

    def prefetch(self, keys: Iterable[ChunkKey]) -> None:
        """Fetch the values in one MGET into a small read-ahead buffer that the next `get` consumes."""
        names = [self._name(k) for k in keys][: self.config.readahead_entries]
        if not names:
            return
        values = self.call("mget", lambda: self.client.mget(names), None) or []
        with self._lock:
            for name, value in zip(names, values):
                if value is not None:
                    self._readahead[name] = value
            while len(self._readahead) > self.config.readahead_entries:
                self._readahead.popitem(last=False)

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + 1)

    def _pattern(self) -> str:
        """SCAN MATCH pattern of this tier's entries: the escaped prefix, then a 64-hex-char digest."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.config.prefix) + "?" * 64

    def counters(self) -> TierStats:
        """Hit/miss/put counters only (cheap: no scan of the stored entries)."""
        with self._lock:
            return TierStats(**self._stats.as_dict())

    def stats(self) -> TierStats:
        count = self.call("scan", lambda: sum(1 for _ in self.client.scan_iter(self._pattern())), 0)
        with self._lock:
            return TierStats(**{**self._stats.as_dict(), "entries": count})
