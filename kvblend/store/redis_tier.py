"""Redis tier: entries shared by hosts, one value per key, layer-sliced reads through GETRANGE.

When the server is down or slow, every call reports a miss (or a failed put), the outage is logged once, and
the tier stays quiet for `retry_s` before trying the server again, so queries never wait on a dead server.

Budget: the tier's entries (all hosts' writers under one prefix) are held to `max_bytes`, least recently used
first out. The accounting lives on the server, beside the entries: a sorted set of entry names by last use
(`<prefix>lru`), their sizes (`<prefix>size`) and the total (`<prefix>bytes`), updated and enforced by one
Lua script per put, so concurrent writers on several hosts see one budget. `ttl_s` (optional) expires
entries not used for that long (every hit renews it). Keep the budget below the server's `maxmemory`: a put
the server refuses (OOM under maxmemory-policy noeviction) is logged and counted as an error, never silent.
Every writer to a shared Redis must be trusted unless the tier has a deployment secret (then entries carry a
MAC and those without a valid one are refused). A URL is only ever shown through `redact_url`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import partial
from typing import Iterable, Sequence
from urllib.parse import parse_qsl, urlencode, urlparse

import numpy as np

from kvblend.store.entry import (
    BytesSource,
    ChunkKV,
    EntryBytes,
    EntryError,
    EntryRefused,
    KVLayout,
    entry_parts,
    entry_codec,
    entry_secret,
    read_entry,
    serialize_parts,
)
from kvblend.store.key import ChunkKey
from kvblend.store.tier import TierCounters, TierStats

log = logging.getLogger(__name__)
_SECRET_QUERY = re.compile(r"pass|secret|token|auth|key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its password (and any password-like query value) replaced by ***, for logs and errors."""
    try:
        parsed = urlparse(url)
        netloc = parsed.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            name, has_password, _ = user.partition(":")
            netloc = f"{name}:***@{host}" if has_password else f"***@{host}"  # a lone user part may be a token
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in parse_qsl(parsed.query)], safe="*")
        return parsed._replace(netloc=netloc, query=query).geturl()
    except ValueError:
        return "<unparseable URL>"


def redacted_repr(config) -> str:
    """The repr of a dataclass config without its repr=False fields (secrets) and with its `redis_url` redacted."""
    shown = {f.name: getattr(config, f.name) for f in fields(config) if f.repr}
    if shown.get("redis_url"):
        shown["redis_url"] = redact_url(shown["redis_url"])
    return f"{type(config).__name__}({', '.join(f'{name}={value!r}' for name, value in shown.items())})"


DEFAULT_TIMEOUT_S = 0.5
DEFAULT_MAX_BYTES = 20 << 30

# KEYS: lru, size, bytes. ARGV: entry name, its size, now (ms), budget (bytes), ttl (ms, 0: none).
# Forget index rows of entries the TTL has expired, account the entry, then evict least recently used
# entries (never the one just written) until the total fits. Returns {entries evicted, bytes held}.
_ACCOUNT = """
local lru, size, total = KEYS[1], KEYS[2], KEYS[3]
local name, n, now, budget, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local function forget(victim)
  local s = tonumber(redis.call('HGET', size, victim) or '0')
  redis.call('HDEL', size, victim)
  redis.call('ZREM', lru, victim)
  redis.call('DECRBY', total, s)
end
if ttl > 0 then
  for _, victim in ipairs(redis.call('ZRANGEBYSCORE', lru, '-inf', now - ttl, 'LIMIT', 0, 256)) do
    if redis.call('EXISTS', victim) == 0 then forget(victim) end
  end
end
local old = tonumber(redis.call('HGET', size, name) or '0')
redis.call('HSET', size, name, n)
redis.call('INCRBY', total, n - old)
redis.call('ZADD', lru, now, name)
local evicted = 0
while tonumber(redis.call('GET', total) or '0') > budget do
  local oldest = redis.call('ZRANGE', lru, 0, 1)
  local victim = oldest[1]
  if victim == name then victim = oldest[2] end
  if not victim then break end
  evicted = evicted + redis.call('DEL', victim)
  forget(victim)
end
return {evicted, tonumber(redis.call('GET', total) or '0')}
"""


@dataclass(frozen=True)
class RedisConfig:
    url: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry_s: float = 5.0
    prefix: str = "kvblend:"
    ttl_s: int | None = None
    readahead_entries: int = 16
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"Redis URL must look like redis://host:port/db, got {redact_url(self.url)!r}")
        if self.timeout_s <= 0 or self.retry_s < 0:
            raise ValueError("Redis timeout must be positive and retry interval non-negative")
        if self.max_bytes <= 0:
            raise ValueError(f"redis tier budget must be positive, got {self.max_bytes}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"redis ttl_s must be positive (or None: no expiry), got {self.ttl_s}")

    def __repr__(self) -> str:
        return (f"RedisConfig(url={redact_url(self.url)!r}, timeout_s={self.timeout_s}, retry_s={self.retry_s}, "
                f"prefix={self.prefix!r}, ttl_s={self.ttl_s}, readahead_entries={self.readahead_entries}, "
                f"max_bytes={self.max_bytes})")


class RedisTier:
    name = "redis"
    synchronous = False
    host_shared_prefetch = False  # its read-ahead buffer is this process's

    def __init__(self, config: RedisConfig | str, secret: str | bytes | None = None, codec: str = "full") -> None:
        import redis

        self.config = RedisConfig(config) if isinstance(config, str) else config
        self.secret, self.codec = entry_secret(secret), entry_codec(codec)
        self.where = redact_url(self.config.url)
        self._errors = (redis.exceptions.RedisError, OSError)
        self._refused = redis.exceptions.ResponseError  # the server is up and said no (e.g. OOM): not an outage
        self.client = redis.Redis.from_url(
            self.config.url, socket_timeout=self.config.timeout_s, socket_connect_timeout=self.config.timeout_s
        )
        self._down_until = 0.0
        self.counts = TierCounters()
        self._lock = threading.Lock()
        self._readahead: OrderedDict[str, bytes] = OrderedDict()
        self._account = self.client.register_script(_ACCOUNT)
        self._index = [self.config.prefix + part for part in ("lru", "size", "bytes")]
        self._full_logged = 0.0
        self.max_bytes = self.config.max_bytes

    def _name(self, key: ChunkKey) -> str:
        return self.config.prefix + key.digest

    def call(self, what: str, fn, default):
        """Run a Redis command; on failure log the outage once, count it, and return `default`."""
        if time.monotonic() < self._down_until:
            return default
        try:
            result = fn()
        except self._refused as exc:
            self.counts.add("errors")
            if time.monotonic() - self._full_logged > self.config.retry_s:
                self._full_logged = time.monotonic()
                log.warning("redis tier %s refused %s: %s (is the server's maxmemory below the tier's budget of "
                            "%d bytes?)", self.where, what, exc, self.config.max_bytes)
            return default
        except self._errors as exc:
            self.counts.add("errors")
            with self._lock:
                first = self._down_until == 0.0
                self._down_until = time.monotonic() + self.config.retry_s
            if first:
                log.warning("redis tier %s unavailable during %s (%s); reporting misses, retrying every %.1fs",
                            self.where, what, exc, self.config.retry_s)
            return default
        if self._down_until:
            log.warning("redis tier %s is reachable again", self.where)
            self._down_until = 0.0
        return result

    @property
    def available(self) -> bool:
        return self.call("ping", self.client.ping, False)

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None) -> ChunkKV | None:
        name = self._name(key)
        with self._lock:
            blob = self._readahead.pop(name, None)
        if blob is not None:
            kv = self._decode(key, lambda: read_entry(BytesSource(blob), key, layers, len(blob), expect, self.secret))
        elif layers is None:
            blob = self.call("get", lambda: self._get_buffer(name), None)
            kv = None if blob is None else self._decode(
                key, lambda: read_entry(BytesSource(blob), key, None, len(blob), expect, self.secret))
        else:
            kv = self._decode(key, lambda: self._read_layers(name, key, layers, expect))
        self.counts.add("hits" if kv is not None else "misses")
        if kv is not None and (layers is None or 0 in layers):  # once per use, not once per layer-sliced read
            self._touch([name])
        return kv

    def get_many(self, keys: Sequence[ChunkKey], expect: KVLayout | None = None) -> list[ChunkKV | None]:
        """Whole entries of `keys` (None for each miss, bad entry or outage), those not read ahead in one MGET;
        every entry is verified as `get` verifies it."""
        names = [self._name(k) for k in keys]
        with self._lock:
            blobs = [self._readahead.pop(n, None) for n in names]
        fetch = [i for i, blob in enumerate(blobs) if blob is None]
        if fetch:
            values = self.call("mget", lambda: self.client.mget([names[i] for i in fetch]), None)
            for i, value in zip(fetch, values or []):
                blobs[i] = value
        out = []
        for key, blob in zip(keys, blobs):
            kv = None if blob is None else self._decode(
                key, partial(read_entry, BytesSource(blob), key, None, len(blob), expect, self.secret))
            self.counts.add("hits" if kv is not None else "misses")
            out.append(kv)
        found = [name for name, kv in zip(names, out) if kv is not None]
        if found:
            self._touch(found)
        return out

    def _decode(self, key: ChunkKey, read) -> ChunkKV | None:
        """`read()`'s entry, or None for a bad one (dropped) or one refused (kept), counted as corrupt."""
        try:
            return read()
        except EntryRefused as exc:
            log.warning("redis tier: refusing entry %s (kept): %s", key.digest, exc)
            self.counts.add("corrupt")
        except EntryError as exc:
            log.warning("redis tier: dropping bad entry %s: %s", key.digest, exc)
            self.counts.add("corrupt")
            self.delete(key)
        return None

    def _touch(self, names: Sequence[str]) -> None:
        """Mark entries just used: most recently used in the LRU index, their TTL renewed."""
        def run():
            pipe = self.client.pipeline(transaction=False)
            now = _now_ms()
            pipe.zadd(self._index[0], {n: now for n in names}, xx=True)
            if self.config.ttl_s:
                for n in names:
                    pipe.expire(n, self.config.ttl_s)
            return pipe.execute()

        self.call("touch", run, None)

    def _get_buffer(self, name: str) -> np.ndarray | None:
        """GET with the reply read from the connection's socket straight into one buffer: redis-py's parsers
        copy a 64 MiB value several times over, which halves the throughput loopback allows. Any surprise
        drops the connection (the pool opens a fresh one) and raises."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("GET", name)
            sock, head = conn._sock, b""
            while b"\r\n" not in head:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("redis closed the connection during GET")
                head += chunk
            line, _, rest = head.partition(b"\r\n")
            if line in (b"$-1", b"_"):
                return None
            if line[:1] != b"$" or not line[1:].isdigit():
                raise ConnectionError(f"unexpected reply to GET: {line[:40]!r}")
            size = int(line[1:]) + 2  # the value, then CRLF
            if len(rest) > size:
                raise ConnectionError("unexpected bytes after the GET reply")
            buf = np.empty(size, dtype=np.uint8)
            view, got = memoryview(buf), len(rest)
            view[:got] = rest
            while got < size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("redis closed the connection during GET")
                got += n
            return buf[:-2]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _read_layers(self, name: str, key: ChunkKey, layers: Sequence[int], expect: KVLayout | None) -> ChunkKV | None:
        """Layer-sliced read: header first, then the wanted tensors in one pipelined GETRANGE batch."""
        size = self.call("strlen", lambda: self.client.strlen(name), 0)  # 0: no such key
        if not size:
            return None
        try:
            return read_entry(_RangeSource(self, name), key, layers, size, expect, self.secret)
        except ConnectionError:
            return None

    def put(self, key: ChunkKey, kv: ChunkKV) -> bool:
        return self.put_bytes(key, serialize_parts(kv, self.secret, self.codec))

    def put_bytes(self, key: ChunkKey, blob: bytes | EntryBytes) -> bool:
        """Store an entry and account it against the budget, evicting least recently used entries (False when
        the entry is larger than the whole budget, or the server refused or failed it)."""
        parts = entry_parts(blob)
        size = sum(memoryview(part).nbytes for part in parts)
        if size > self.config.max_bytes:
            return False
        name = self._name(key)
        if not self.call("set", lambda: self._set_parts(name, parts, size), False):
            return False
        ttl_ms = (self.config.ttl_s or 0) * 1000
        result = self.call("account", lambda: self._account(
            keys=self._index, args=[name, size, _now_ms(), self.config.max_bytes, ttl_ms]), None)
        self.counts.add("puts")
        if result is not None:
            self.counts.add("evictions", n=int(result[0]))
        return True

    def _set_parts(self, name: str, parts: tuple, size: int) -> bool:
        """SET (with the TTL, if any) whose value is written to the socket part by part, never joined into one
        copy (redis-py would need the value as one buffer); an error reply is raised by redis-py's parser."""
        expiry = [b"EX", str(self.config.ttl_s).encode()] if self.config.ttl_s else []
        bulk = lambda arg: b"$%d\r\n%s\r\n" % (len(arg), arg)  # noqa: E731 - RESP bulk string
        head = b"*%d\r\n" % (3 + len(expiry)) + bulk(b"SET") + bulk(name.encode()) + b"$%d\r\n" % size
        tail = b"\r\n" + b"".join(bulk(arg) for arg in expiry)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([head, *parts, tail], check_health=False)
            reply = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return reply in (b"OK", "OK")

    def held_bytes(self) -> int:
        """Bytes of this prefix's entries by the server-side account (0 when unreachable)."""
        return int(self.call("bytes", lambda: self.client.get(self._index[2]), None) or 0)

    def server_limits(self) -> dict:
        """The server's memory limit and eviction policy, and its memory in use (empty if it will not say)."""
        config = self.call("config get", lambda: self.client.config_get("maxmemory*"), {}) or {}
        info = self.call("info memory", lambda: self.client.info("memory"), {}) or {}
        return {"maxmemory": int(config.get("maxmemory", 0) or 0), "maxmemory_policy": config.get("maxmemory-policy"),
                "used_memory": int(info.get("used_memory", 0) or 0)}

    def contains(self, key: ChunkKey) -> bool:
        return bool(self.call("exists", lambda: self.client.exists(self._name(key)), 0))

    def delete(self, key: ChunkKey) -> None:
        name = self._name(key)
        with self._lock:
            self._readahead.pop(name, None)

        def run():
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(name)
            pipe.hget(self._index[1], name)
            pipe.hdel(self._index[1], name)
            pipe.zrem(self._index[0], name)
            deleted, size, *_ = pipe.execute()
            if size is not None:
                self.client.decrby(self._index[2], int(size))
            return deleted

        self.call("delete", run, 0)

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
        found = [n for n, v in zip(names, values) if v is not None]
        if found:
            self._touch(found)

    def _pattern(self) -> str:
        """SCAN MATCH pattern of this tier's entries: the escaped prefix, then a 64-hex-char digest."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.config.prefix) + "?" * 64

    def counters(self) -> TierStats:
        """Hit/miss/put counters only (cheap: no scan of the stored entries)."""
        return self.counts.snapshot()

    def stats(self) -> TierStats:
        count = self.call("scan", lambda: sum(1 for _ in self.client.scan_iter(self._pattern())), 0)
        return self.counts.snapshot(count, self.held_bytes())


def _now_ms() -> int:
    return int(time.time() * 1000)


class _RangeSource:
    """An entry on the Redis server, read through pipelined GETRANGEs (ConnectionError when the server fails)."""

    def __init__(self, tier: RedisTier, name: str) -> None:
        self.tier, self.name = tier, name

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        def run():
            pipe = self.tier.client.pipeline(transaction=False)
            for offset, length in ranges:
                pipe.getrange(self.name, offset, offset + length - 1)
            return pipe.execute()

        failed = object()
        out = self.tier.call("getrange", run, failed)
        if out is failed:
            raise ConnectionError("redis unavailable")
        return out

    def read_into(self, targets: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        spans = [(offset, sum(buf.nbytes for buf in buffers)) for offset, buffers in targets]
        for (offset, buffers), blob in zip(targets, self.read(spans)):
            BytesSource(blob).read_into([(0, buffers)])
