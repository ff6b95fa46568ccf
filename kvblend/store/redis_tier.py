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

A read that fails verification deletes the entry only if it is bad on its own: the value is read again whole
(one GET under WATCH) and deleted only if that copy fails too and nobody rewrote it meanwhile. A layer-sliced
read takes several requests, so one that straddles another writer's rewrite is a plain miss.

Redis Cluster (`redis+cluster://` URLs): a Lua script may only touch one hash slot's keys, so entries are spread
over `buckets` hash tags, each bucket with its own account (`<prefix>{tag}lru`, ...) in its own slot and
`max_bytes / buckets` of the budget. A node that fails is skipped for `retry_s` (its entries are misses, the
other shards serve) while the slot map is refreshed in the background until a replica has taken over.
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

from kvblend.transport.redis_client import SCHEMES, RedisConnection, cluster_seeds, is_cluster_url, redis_errors
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
DEFAULT_BUCKETS = 16
SLOTS = 16384  # hash slots of a Redis Cluster
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")  # error replies of a cluster whose slots are moving

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

# KEYS: entry, lru, size, bytes. Delete the entry and its row of the account. Returns the number deleted.
_FORGET = """
local s = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
redis.call('HDEL', KEYS[3], KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('DECRBY', KEYS[4], s)
return redis.call('DEL', KEYS[1])
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
    buckets: int = DEFAULT_BUCKETS  # on a cluster: hash-tagged groups of entries, each with max_bytes / buckets

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in SCHEMES:
            raise ValueError(f"Redis URL must look like redis://host:port/db or redis+cluster://host:port,host:port, "
                             f"got {redact_url(self.url)!r}")
        if not 1 <= self.buckets <= SLOTS:
            raise ValueError(f"redis buckets must be in 1..{SLOTS}, got {self.buckets}")
        if is_cluster_url(self.url):
            cluster_seeds(self.url)
            if "{" in self.prefix or "}" in self.prefix:
                raise ValueError(f"on a Redis Cluster the key prefix may not contain braces (hash tags), got {self.prefix!r}")
        if self.timeout_s <= 0 or self.retry_s < 0:
            raise ValueError("Redis timeout must be positive and retry interval non-negative")
        if self.max_bytes <= 0:
            raise ValueError(f"redis tier budget must be positive, got {self.max_bytes}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"redis ttl_s must be positive (or None: no expiry), got {self.ttl_s}")

    def __repr__(self) -> str:
        return (f"RedisConfig(url={redact_url(self.url)!r}, timeout_s={self.timeout_s}, retry_s={self.retry_s}, "
                f"prefix={self.prefix!r}, ttl_s={self.ttl_s}, readahead_entries={self.readahead_entries}, "
                f"max_bytes={self.max_bytes}, buckets={self.buckets})")


class RedisTier:
    name = "redis"
    synchronous = False
    host_shared_prefetch = False  # its read-ahead buffer is this process's

    def __init__(self, config: RedisConfig | str, secret: str | bytes | None = None, codec: str = "full") -> None:
        import redis
        from redis.commands.core import Script

        self.config = RedisConfig(config) if isinstance(config, str) else config
        self.secret, self.codec = entry_secret(secret), entry_codec(codec)
        self.where = redact_url(self.config.url)
        self._errors = redis_errors()
        self._refused = redis.exceptions.ResponseError  # the server is up and said no (e.g. OOM): not an outage
        self._moved = (redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.ClusterError,
                       redis.exceptions.SlotNotCoveredError)  # a cluster whose slots moved: refresh, no outage
        self._redirect = redis.exceptions.ClusterError  # what the tier's own GET raises for such a reply
        self._watch_error = redis.exceptions.WatchError
        self._connection = RedisConnection(self.config.url, self.config.timeout_s, self.config.retry_s)
        self.cluster = self._connection.cluster
        self._tags = _bucket_tags(self.config.buckets) if self.cluster else [""]
        self._bucket_bytes = self.config.max_bytes // len(self._tags)
        self._down_until: dict[str, float] = {}  # "" (the server, or the cluster as a whole), else a cluster node
        self._refreshing = False
        self.counts = TierCounters()
        self._lock = threading.Lock()
        self._readahead: OrderedDict[str, bytes] = OrderedDict()
        self._account = Script(None, _ACCOUNT.encode())  # run on the node of the entry's slot
        self._forget = Script(None, _FORGET.encode())
        self._full_logged = 0.0
        self.max_bytes = self.config.max_bytes

    @property
    def client(self):
        """redis.Redis, or redis.cluster.RedisCluster for a cluster URL (commands routed by key)."""
        return self._connection.get()

    def _name(self, key: ChunkKey) -> str:
        """The entry's Redis key: prefix, on a cluster the hash tag of the key's bucket, then the digest."""
        return self.config.prefix + self._tags[int(key.digest[:8], 16) % len(self._tags)] + key.digest

    def _index(self, name: str) -> list[str]:
        """The account of the bucket entry `name` is in (on a cluster, in the entry's slot)."""
        return self._bucket_index(name[len(self.config.prefix) : -64])

    def _bucket_index(self, tag: str) -> list[str]:
        """The keys of a bucket's account: entries by last use, their sizes, their total."""
        return [self.config.prefix + tag + part for part in ("lru", "size", "bytes")]

    def _node(self, name: str):
        """The client of the server holding `name`: the one server, or the master of its slot."""
        if not self.cluster:
            return self.client
        return self.client.get_redis_connection(self.client.get_node_from_key(name))

    def call(self, what: str, fn, default, key: str | None = None):
        """Run a Redis command (on a cluster, one routed by `key`); on failure log the outage once, count it, and
        return `default`. A cluster node that fails is skipped for `retry_s` (its entries are misses, the
        other shards serve) while the slot map is refreshed in the background, so a replica taking over is used
        as soon as the cluster has promoted it."""
        node = ""
        try:
            if self.cluster and key is not None:
                node = self.client.get_node_from_key(key).name
        except self._errors as exc:
            return self._failed(what, "", exc, default)
        if time.monotonic() < self._down_until.get(node, 0.0):
            return default
        try:
            result = fn()
        except self._moved as exc:
            self.counts.add("errors")
            log.info("redis tier %s: cluster slots moved during %s (%s); refreshing them", self.where, what, exc)
            self._refresh_slots()
            return default
        except self._refused as exc:
            self.counts.add("errors")
            if time.monotonic() - self._full_logged > self.config.retry_s:
                self._full_logged = time.monotonic()
                log.warning("redis tier %s refused %s: %s (is the server's maxmemory below the tier's budget of "
                            "%d bytes?)", self.where, what, exc, self.config.max_bytes)
            return default
        except self._errors as exc:
            return self._failed(what, node, exc, default)
        if node in self._down_until:
            with self._lock:
                back = self._down_until.pop(node, None) is not None
            if back:
                log.warning("redis tier %s%s is reachable again", self.where, f" node {node}" if node else "")
        return result

    def _failed(self, what: str, node: str, exc: BaseException, default):
        """Count and log (once per outage) a failed command, and skip `node` for `retry_s`."""
        self.counts.add("errors")
        with self._lock:
            first = node not in self._down_until
            self._down_until[node] = time.monotonic() + self.config.retry_s
        if first:
            log.warning("redis tier %s%s unavailable during %s (%s); reporting misses, retrying every %.1fs",
                        self.where, f" node {node}" if node else "", what, exc, self.config.retry_s)
        self._refresh_slots()
        return default

    def _refresh_slots(self) -> None:
        """On a cluster, re-read the slot map in the background until no failed node is a master any more (a
        replica took over) or every failed node's retry time has come (nothing on a single server)."""
        if not self.cluster:
            return
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        threading.Thread(target=self._refresh_loop, name="kvblend-redis-slots", daemon=True).start()

    def _refresh_loop(self) -> None:
        try:
            while not self._slots_refreshed():
                time.sleep(min(0.25, self.config.timeout_s))
        finally:
            with self._lock:
                self._refreshing = False

    def _slots_refreshed(self) -> bool:
        """Re-read the slot map once: whether that is enough (no node still skipped is a master in it)."""
        try:
            self.client.nodes_manager.initialize()
            masters = {node.name for node in self.client.get_primaries()} | {""}
        except self._errors as exc:
            log.debug("redis tier %s: slot refresh failed: %s", self.where, exc)
            masters = None
        now = time.monotonic()
        with self._lock:
            waiting = {node for node, until in self._down_until.items() if until > now}
        return not waiting or (masters is not None and not waiting & masters)

    @property
    def available(self) -> bool:
        return self.call("ping", lambda: self.client.ping(), False)

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None) -> ChunkKV | None:
        name = self._name(key)
        with self._lock:
            blob = self._readahead.pop(name, None)
        if blob is not None:
            kv = self._decode(key, expect, lambda: read_entry(BytesSource(blob), key, layers, len(blob), expect, self.secret))
        elif layers is None:
            blob = self.call("get", lambda: self._get_buffer(name), None, key=name)
            kv = None if blob is None else self._decode(
                key, expect, lambda: read_entry(BytesSource(blob), key, None, len(blob), expect, self.secret))
        else:
            kv = self._decode(key, expect, lambda: self._read_layers(name, key, layers, expect))
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
        for i, value in zip(fetch, self._mget([names[i] for i in fetch])):
            blobs[i] = value
        out = []
        for key, blob in zip(keys, blobs):
            kv = None if blob is None else self._decode(
                key, expect, partial(read_entry, BytesSource(blob), key, None, len(blob), expect, self.secret))
            self.counts.add("hits" if kv is not None else "misses")
            out.append(kv)
        found = [name for name, kv in zip(names, out) if kv is not None]
        if found:
            self._touch(found)
        return out

    def _decode(self, key: ChunkKey, expect: KVLayout | None, read) -> ChunkKV | None:
        """`read()`'s entry, or None: for one refused (kept) or bad (dropped if bad on its own), counted as corrupt."""
        try:
            return read()
        except EntryRefused as exc:
            log.warning("redis tier: refusing entry %s (kept): %s", key.digest, exc)
            self.counts.add("corrupt")
        except EntryError as exc:
            self._drop_if_corrupt(key, expect, exc)
        return None

    def _drop_if_corrupt(self, key: ChunkKey, expect: KVLayout | None, failure: EntryError) -> None:
        """Delete the entry only if its current value, read whole in one GET under WATCH, is bad on its own and
        nobody rewrites it before the delete: a read that failed because a writer replaced the entry meanwhile (a
        sliced read takes several requests; a read-ahead value may be stale) is a plain miss, never a deletion."""
        name = self._name(key)
        watch_error = self._watch_error

        def run() -> EntryError | None:
            with self._node(name).pipeline(transaction=True) as pipe:
                pipe.watch(name)
                blob = pipe.get(name)
                if blob is None:
                    return None
                try:
                    read_entry(BytesSource(blob), key, None, len(blob), expect, self.secret, parallel=False)
                    return None
                except EntryRefused:
                    return None
                except EntryError as exc:
                    pipe.multi()
                    self._forget(keys=[name, *self._index(name)], client=pipe)
                    try:
                        pipe.execute()
                    except watch_error:
                        return None
                    return exc

        bad = self.call("drop", run, None, key=name)
        if bad is None:
            log.info("redis tier: entry %s changed while read (%s): a miss, kept", key.digest[:12], failure)
            return
        log.warning("redis tier: dropped bad entry %s: %s", key.digest, bad)
        self.counts.add("corrupt")
        with self._lock:
            self._readahead.pop(name, None)

    def _buckets(self, names: Sequence[str]) -> dict[str, list[str]]:
        """`names` grouped by bucket (on a cluster, one slot each: a group is one multi-key command)."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name[: -64], []).append(name)
        return groups

    def _mget(self, names: Sequence[str]) -> list:
        """The values of `names` (None for each missing or unreachable one): one MGET per bucket."""
        values = {}
        for group in self._buckets(names).values():
            got = self.call("mget", lambda group=group: self._node(group[0]).mget(group), None, key=group[0])
            values.update(zip(group, got or [None] * len(group)))
        return [values[name] for name in names]

    def _touch(self, names: Sequence[str]) -> None:
        """Mark entries just used: most recently used in the LRU index, their TTL renewed."""
        def run(group: list[str]):
            pipe = self._node(group[0]).pipeline(transaction=False)
            now = _now_us()
            pipe.zadd(self._index(group[0])[0], {n: now for n in group}, xx=True)
            if self.config.ttl_s:
                for n in group:
                    pipe.expire(n, self.config.ttl_s)
            return pipe.execute()

        for group in self._buckets(names).values():
            self.call("touch", partial(run, group), None, key=group[0])

    def _get_buffer(self, name: str) -> np.ndarray | None:
        """GET with the reply read from the connection's socket straight into one buffer: redis-py's parsers
        copy a 64 MiB value several times over, which halves the throughput loopback allows. Any surprise
        drops the connection (the pool opens a fresh one) and raises."""
        pool = self._node(name).connection_pool
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
            if line[:1] == b"-":  # an error reply; MOVED, ASK...: the slot has another master now
                text = line[1:].decode(errors="replace")
                raise (self._redirect if text.startswith(_REDIRECTS) else self._refused)(text)
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
        size = self.call("strlen", lambda: self._node(name).strlen(name), 0, key=name)  # 0: no such key
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
        if size > self._bucket_bytes:
            return False
        name = self._name(key)
        if not self.call("set", lambda: self._set_parts(name, parts, size), False, key=name):
            return False
        ttl_us = (self.config.ttl_s or 0) * 1_000_000
        result = self.call("account", lambda: self._account(
            keys=self._index(name), args=[name, size, _now_us(), self._bucket_bytes, ttl_us], client=self._node(name)),
            None, key=name)
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
        pool = self._node(name).connection_pool
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
        totals = [self._bucket_index(tag)[2] for tag in self._tags]
        return sum(int(self.call("bytes", lambda t=t: self._node(t).get(t), None, key=t) or 0) for t in totals)

    def server_limits(self) -> dict:
        """The server's memory limit and eviction policy, and its memory in use (on a cluster: summed over the
        masters; 0 and None where it will not say)."""
        configs = self.call("config get", lambda: [node.config_get("maxmemory*") for node in self._masters()], [])
        infos = self.call("info memory", lambda: [node.info("memory") for node in self._masters()], [])
        return {"maxmemory": sum(int(c.get("maxmemory", 0) or 0) for c in configs or []),
                "maxmemory_policy": configs[0].get("maxmemory-policy") if configs else None,
                "used_memory": sum(int(i.get("used_memory", 0) or 0) for i in infos or [])}

    def contains(self, key: ChunkKey) -> bool:
        name = self._name(key)
        return bool(self.call("exists", lambda: self._node(name).exists(name), 0, key=name))

    def delete(self, key: ChunkKey) -> None:
        name = self._name(key)
        with self._lock:
            self._readahead.pop(name, None)
        self.call("delete", lambda: self._forget(keys=[name, *self._index(name)], client=self._node(name)), 0, key=name)

    def prefetch(self, keys: Iterable[ChunkKey]) -> None:
        """Fetch the values in one MGET into a small read-ahead buffer that the next `get` consumes."""
        names = [self._name(k) for k in keys][: self.config.readahead_entries]
        if not names:
            return
        values = self._mget(names)
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
        """SCAN MATCH pattern of this tier's entries: the escaped prefix, a bucket's hash tag on a cluster, then a
        64-hex-char digest."""
        tag = "{*}" if self.cluster else ""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.config.prefix) + tag + "?" * 64

    def _masters(self) -> list:
        """A client per master: the one server, or every master of the cluster."""
        if not self.cluster:
            return [self.client]
        return [self.client.get_redis_connection(node) for node in self.client.get_primaries()]

    def counters(self) -> TierStats:
        """Hit/miss/put counters only (cheap: no scan of the stored entries)."""
        return self.counts.snapshot()

    def stats(self) -> TierStats:
        count = self.call("scan", lambda: sum(1 for node in self._masters() for _ in node.scan_iter(self._pattern())), 0)
        return self.counts.snapshot(count, self.held_bytes())


def _bucket_tags(count: int) -> list[str]:
    """`count` hash tags, the i-th hashing into the i-th of `count` equal slot ranges: a cluster whose masters own
    equal runs of slots (what `redis-cli --cluster create` makes) holds an equal share of the buckets on each."""
    from redis.crc import key_slot

    tags = []
    for i in range(count):
        low, high, j = i * SLOTS // count, (i + 1) * SLOTS // count, 0
        while not low <= key_slot(f"kvblend{i}.{j}".encode()) < high:
            j += 1
        tags.append(f"{{kvblend{i}.{j}}}")
    return tags


def _now_us() -> int:
    """An LRU score: microseconds (milliseconds tie between puts on a fast host, and a tie evicts by name, not age;
    a double holds today's microsecond count exactly)."""
    return time.time_ns() // 1000


class _RangeSource:
    """An entry on the Redis server, read through pipelined GETRANGEs (ConnectionError when the server fails)."""

    def __init__(self, tier: RedisTier, name: str) -> None:
        self.tier, self.name = tier, name

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        def run():
            pipe = self.tier._node(self.name).pipeline(transaction=False)
            for offset, length in ranges:
                pipe.getrange(self.name, offset, offset + length - 1)
            return pipe.execute()

        failed = object()
        out = self.tier.call("getrange", run, failed, key=self.name)
        if out is failed:
            raise ConnectionError("redis unavailable")
        return out

    def read_into(self, targets: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        spans = [(offset, sum(buf.nbytes for buf in buffers)) for offset, buffers in targets]
        for (offset, buffers), blob in zip(targets, self.read(spans)):
            BytesSource(blob).read_into([(0, buffers)])
