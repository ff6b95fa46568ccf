"""TieredStore: memory -> disk -> peers -> Redis (order configurable), read-through with promotion, write-through
with background writes."""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvblend.cpu import unpin_thread
from kvblend.paths import cache_dir
from kvblend.store.anchors import ChunkAnchorIndex
from kvblend.store.disk import DiskTier
from kvblend.store.entry import SECRET_ENV, ChunkKV, EntryBytes, KVLayout, entry_codec, entry_secret, serialize_parts
from kvblend.store.key import ChunkKey
from kvblend.store.ledger import COUNTED, FileLedger, Ledger, RedisLedger
from kvblend.store.load_meter import LoadMeter
from kvblend.store.memory import MemoryTier
from kvblend.store.peer import PeerConfig, PeerTier
from kvblend.store.redis_tier import DEFAULT_TIMEOUT_S, RedisConfig, RedisTier, redact_url
from kvblend.store.tier import Tier, TierCounters, TierStats

log = logging.getLogger(__name__)
_STOP = object()
GIB = 1 << 30
DEFAULT_MEMORY_GB = 2.0
DEFAULT_DISK_GB = 20.0
DEFAULT_REDIS_GB = 20.0
DEFAULT_PEER_GB = 2.0
COUNTERS_FILE = "counters.json"
TIERS = ("memory", "disk", "peer", "redis")  # every tier a store can have, in the default read order
DEFAULT_CODECS = {"disk": "full", "peer": "int6", "redis": "int6"}  # why: docs/storage.md, "Storage codecs"


def default_store_dir() -> Path:
    """The disk tier's directory unless one is given: cache_dir()/"store"."""
    return cache_dir() / "store"


@dataclass(frozen=True)
class StoreConfig:
    """Which tiers exist, their budgets (each tier evicts its least recently used entries beyond its budget), and
    the order reads try them (`tier_order`, default memory, disk, peer, Redis: a local miss asks the live peers
    before Redis's copy, and recomputing comes last). `redis_ttl_s` (None: none) also expires Redis entries
    unused for that long. The peer tier exists when `directory_url` (a Redis URL, may be `redis_url`'s server) is
    given: this instance exports what it stores over NIXL and reads what other instances hold, each peer read
    bounded by `peer_timeout_s`; an instance missing `peer_ttl_s` of heartbeats drops out of the directory.
    `counters_every_s`: how often this process adds its tiers' counters to the store's ledger (and at close).
    `secret` (default: the KVBLEND_STORE_SECRET environment variable) makes disk, peer and Redis entries carry a
    MAC and refuses those without a valid one; without it every writer to a shared tier must be trusted.
    `disk_codec`, `peer_codec`, `redis_codec`: how each tier stores KV ("full": the model's dtype, "fp8", "int6", "int4";
    the memory tier always holds it decoded); a reader decodes any entry, whatever codec wrote it."""

    memory_bytes: int = int(DEFAULT_MEMORY_GB * GIB)
    disk_dir: str | None = None
    disk_bytes: int = int(DEFAULT_DISK_GB * GIB)
    redis_url: str | None = None
    redis_timeout_s: float = DEFAULT_TIMEOUT_S
    redis_bytes: int = int(DEFAULT_REDIS_GB * GIB)
    redis_ttl_s: int | None = None
    write_queue: int = 64
    counters_every_s: float = 30.0
    secret: str | None = field(default_factory=lambda: os.environ.get(SECRET_ENV), repr=False)
    tier_order: tuple[str, ...] = TIERS
    directory_url: str | None = None
    peer_instance: str | None = None  # this instance's name in the directory (None: host-pid-random)
    peer_bytes: int = int(DEFAULT_PEER_GB * GIB)
    peer_timeout_s: float = 1.0
    peer_ttl_s: float = 10.0
    disk_codec: str = DEFAULT_CODECS["disk"]
    peer_codec: str = DEFAULT_CODECS["peer"]
    redis_codec: str = DEFAULT_CODECS["redis"]

    @classmethod
    def from_settings(cls, store_dir: str | os.PathLike | None = None, memory_gb: float = DEFAULT_MEMORY_GB,
                      disk_gb: float = DEFAULT_DISK_GB, redis_url: str | None = None,
                      redis_timeout_s: float = DEFAULT_TIMEOUT_S, redis_gb: float = DEFAULT_REDIS_GB,
                      redis_ttl_s: int | None = None, disk: bool = True,
                      directory_url: str | None = None, codecs: dict[str, str] | None = None) -> StoreConfig:
        """The tiers the CLI, a RAGPipeline and the connector open: budgets in GiB, the disk tier in `store_dir`
        (None: default_store_dir(); `disk` False: no disk tier), Redis when a URL is given, peers when a
        directory URL is given; `codecs` overrides tiers' storage codecs, e.g. {"redis": "fp8"}."""
        unknown = sorted(set(codecs or {}) - set(DEFAULT_CODECS))
        if unknown:
            raise ValueError(f"codecs name tiers {unknown}; tiers with a codec: {sorted(DEFAULT_CODECS)}")
        if memory_gb <= 0 or disk_gb <= 0 or redis_gb <= 0:
            raise ValueError(f"memory_gb, disk_gb and redis_gb must be positive, got {memory_gb}, {disk_gb} "
                             f"and {redis_gb}")
        disk_dir = str(store_dir or default_store_dir()) if disk else None
        return cls(memory_bytes=int(memory_gb * GIB), disk_dir=disk_dir,
                   disk_bytes=int(disk_gb * GIB), redis_url=redis_url, redis_timeout_s=redis_timeout_s,
                   redis_bytes=int(redis_gb * GIB), redis_ttl_s=redis_ttl_s, directory_url=directory_url,
                   **{f"{tier}_codec": codec for tier, codec in (codecs or {}).items()})

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if self.disk_bytes <= 0:
            raise ValueError(f"disk_bytes must be positive, got {self.disk_bytes}")
        if self.write_queue <= 0 or self.counters_every_s <= 0:
            raise ValueError(f"write_queue and counters_every_s must be positive, got {self.write_queue} and "
                             f"{self.counters_every_s}")
        if self.redis_url is not None:
            self.redis_config()
        if self.directory_url is not None:
            RedisConfig(self.directory_url)
        if self.peer_bytes <= 0 or self.peer_timeout_s <= 0 or self.peer_ttl_s <= 0:
            raise ValueError(f"peer_bytes, peer_timeout_s and peer_ttl_s must be positive, got "
                             f"{self.peer_bytes}, {self.peer_timeout_s} and {self.peer_ttl_s}")
        order = tuple(self.tier_order)
        if len(set(order)) != len(order) or not set(order) <= set(TIERS) or "memory" not in order:
            raise ValueError(f"tier_order must name distinct tiers among {TIERS}, memory included; got {order}")
        configured = {"disk": self.disk_dir, "peer": self.directory_url, "redis": self.redis_url}
        unordered = [name for name, value in configured.items() if value and name not in order]
        if unordered:
            raise ValueError(f"tiers {unordered} are configured but missing from tier_order {order}")
        entry_secret(self.secret)
        for codec in (self.disk_codec, self.peer_codec, self.redis_codec):
            entry_codec(codec)

    def redis_config(self) -> RedisConfig:
        return RedisConfig(self.redis_url, timeout_s=self.redis_timeout_s, ttl_s=self.redis_ttl_s,
                           max_bytes=self.redis_bytes)

    def __repr__(self) -> str:
        url = None if self.redis_url is None else redact_url(self.redis_url)
        directory = None if self.directory_url is None else redact_url(self.directory_url)
        return (f"StoreConfig(memory_bytes={self.memory_bytes}, disk_dir={self.disk_dir!r}, disk_bytes={self.disk_bytes}, "
                f"redis_url={url!r}, redis_timeout_s={self.redis_timeout_s}, redis_bytes={self.redis_bytes}, "
                f"redis_ttl_s={self.redis_ttl_s}, write_queue={self.write_queue}, "
                f"authenticated={self.secret is not None}, tier_order={self.tier_order}, directory_url={directory!r}, "
                f"peer_instance={self.peer_instance!r}, peer_bytes={self.peer_bytes}, "
                f"peer_timeout_s={self.peer_timeout_s}, peer_ttl_s={self.peer_ttl_s}, disk_codec={self.disk_codec!r}, "
                f"peer_codec={self.peer_codec!r}, redis_codec={self.redis_codec!r})")


def open_store(config: StoreConfig) -> TieredStore:
    """The configured tiers in `tier_order`, and a chunk index and counter ledger kept beside the persistent ones
    (the disk tier's directory, else the Redis server)."""
    built: dict[str, Tier] = {"memory": MemoryTier(config.memory_bytes)}
    anchors_dir, redis, ledger = None, None, None
    if config.disk_dir:
        built["disk"] = DiskTier(config.disk_dir, config.disk_bytes, config.secret, config.disk_codec)
        anchors_dir = Path(config.disk_dir) / "index"
        ledger = FileLedger(Path(config.disk_dir) / COUNTERS_FILE)
    if config.redis_url:
        redis = RedisTier(config.redis_config(), config.secret, config.redis_codec)
        built["redis"] = redis
        ledger = ledger or RedisLedger(redis)
    if config.directory_url:
        instance = config.peer_instance or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        built["peer"] = PeerTier(PeerConfig(config.directory_url, instance, config.peer_bytes, config.peer_timeout_s,
                                            config.peer_ttl_s), config.secret, config.peer_codec)
    tiers = [built[name] for name in config.tier_order if name in built]
    return TieredStore(tiers, write_queue=config.write_queue, anchors=ChunkAnchorIndex(anchors_dir, redis),
                       ledger=ledger, counters_every_s=config.counters_every_s)


class TieredStore:
    """One interface over several tiers. Synchronous tiers are written on the caller's thread, the others
    by one background writer fed through a bounded queue (a full queue makes `put` wait, never drop)."""

    def __init__(self, tiers: Sequence[Tier], write_queue: int = 64,
                 anchors: ChunkAnchorIndex | None = None, ledger: Ledger | None = None,
                 counters_every_s: float = 30.0) -> None:
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = list(tiers)
        self.anchors = anchors if anchors is not None else ChunkAnchorIndex()
        self.ledger = ledger
        self.counters_every_s = counters_every_s
        self._recorded = {tier.name: TierStats() for tier in self.tiers}
        self._moved = {tier.name: TierCounters() for tier in self.tiers}  # bytes read from and written to each
        self._record_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=write_queue)
        self._queued = 0  # background writes queued so far; they finish in this order
        self._enqueue = threading.Lock()
        self._written = 0
        self._written_cond = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="kvblend-store-writer", daemon=True)
        self._writer.start()
        self._prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvblend-prefetch",
                                              initializer=unpin_thread)
        self.meter = LoadMeter()
        self._inflight: dict[str, Future] = {}  # digest -> the prefetch loading it into the fastest tier
        self._inflight_lock = threading.Lock()

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None,
            tier: str | None = None, encoded: bool = False) -> ChunkKV | None:
        """First tier that has the key (of the model's layout `expect`, if given) wins; a whole-entry hit is
        promoted into the faster tiers. A key being prefetched is waited for, not read a second time. `tier`
        names the one tier to read from (the loading controller's choice), else every tier is tried. The entry
        comes decoded to the model dtype on the CPU, or with `encoded` as the tier stored it (the caller decodes
        it on its device: `ChunkKV.decoded`)."""
        chosen = None if tier is None else self._tier(tier)
        if chosen is None or chosen is self.tiers[0]:
            self._await_prefetch(key)
        kv = self._read(chosen, key, layers, expect) if chosen is not None else self._get(key, layers, expect)
        return kv if kv is None or encoded else kv.decoded()

    def _await_prefetch(self, key: ChunkKey) -> None:
        with self._inflight_lock:
            pending = self._inflight.get(key.digest)
        if pending is not None:
            try:
                pending.result()
            except Exception:  # the prefetch failed: the caller reads it (every tier failure is already a miss)
                log.exception("store: prefetch of %s failed", key.digest[:12])

    def get_many(self, keys: Sequence[ChunkKey], expect: KVLayout | None = None) -> list[ChunkKV | None]:
        """Whole entries of `keys`, in order (None where no tier holds a good copy): each tier is asked once for
        every key still missing (Redis: one MGET), hits from a slower tier are promoted into the faster ones.
        Keys being prefetched are waited for first. What a storage-mode load reads for all of a request's spans."""
        for key in keys:
            self._await_prefetch(key)
        return self._read_many(keys, expect)

    def _read_many(self, keys: Sequence[ChunkKey], expect: KVLayout | None) -> list[ChunkKV | None]:
        """`get_many` without waiting for prefetches (what a prefetch itself runs)."""
        found: list[ChunkKV | None] = [None] * len(keys)
        for i, tier in enumerate(self.tiers):
            missing = [j for j, kv in enumerate(found) if kv is None]
            if not missing:
                break
            start = time.perf_counter()
            wanted = [keys[j] for j in missing]
            got = tier.get_many(wanted, expect)
            hits = [(j, kv) for j, kv in zip(missing, got) if kv is not None]
            if hits:
                nbytes = sum(kv.nbytes for _, kv in hits)
                self.meter.record(tier.name, time.perf_counter() - start, nbytes)
                self._moved[tier.name].add("bytes_read", n=nbytes)
            for j, kv in hits:
                found[j] = kv = kv.decoded()
                if i > 0:
                    self._write(keys[j], kv, self.tiers[:i])
        return found

    def _tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise ValueError(f"no tier {name!r} in this store (tiers: {[t.name for t in self.tiers]})")

    def _read(self, tier: Tier, key: ChunkKey, layers: Sequence[int] | None, expect: KVLayout | None) -> ChunkKV | None:
        """One tier's read, timed into the load meter when it hits."""
        start = time.perf_counter()
        kv = tier.get(key, layers, expect)
        if kv is not None:
            self.meter.record(tier.name, time.perf_counter() - start, kv.nbytes)
            self._moved[tier.name].add("bytes_read", n=kv.nbytes)
        return kv

    def fastest_holder(self, key: ChunkKey) -> str | None:
        """The fastest tier holding `key` (a key being prefetched: the fastest tier), asking slower tiers only
        while faster ones lack it; None where none holds it."""
        with self._inflight_lock:
            if key.digest in self._inflight:
                return self.tiers[0].name
        return next((tier.name for tier in self.tiers if tier.contains(key)), None)

    def holders(self, keys: Sequence[ChunkKey]) -> list[str]:
        """The tiers that hold every one of `keys`, fastest first (a key being prefetched counts as held by the
        fastest tier, which its reads wait for)."""
        with self._inflight_lock:
            inflight = set(self._inflight)
        fastest = self.tiers[0]
        return [tier.name for tier in self.tiers
                if all(tier.contains(k) or (tier is fastest and k.digest in inflight) for k in keys)]

    def _get(self, key: ChunkKey, layers: Sequence[int] | None, expect: KVLayout | None) -> ChunkKV | None:
        for i, tier in enumerate(self.tiers):
            kv = self._read(tier, key, layers, expect)
            if kv is None:
                continue
            if layers is None and i > 0:
                kv = kv.decoded()
                self._write(key, kv, self.tiers[:i])
            return kv
        return None

    def put(self, key: ChunkKey, kv: ChunkKV) -> None:
        """Write-through to every tier; chunks computed alone are also indexed for discovery (after their
        entry is written). The store owns `kv` afterwards: do not modify its tensors."""
        if kv.key != key:
            raise ValueError("entry does not belong to the key it is stored under")
        self._write(key, kv, self.tiers, anchor=key.is_alone)

    def _write(self, key: ChunkKey, kv: ChunkKV, tiers: Sequence[Tier], anchor: bool = False) -> None:
        slow = []
        for tier in tiers:
            if tier.synchronous:
                if tier.put(key, kv):
                    self._moved[tier.name].add("bytes_written", n=kv.nbytes)
            else:
                slow.append(tier)
        if slow:
            with self._enqueue:  # numbered in queue order, so `flush` knows when the ones before it are done
                self._queued += 1
                self._queue.put((key, kv, slow, anchor))
        elif anchor:
            self.anchors.add(kv.token_ids.tolist(), key.namespace)

    def _write_loop(self) -> None:
        unpin_thread()
        while True:
            try:
                item = self._queue.get(timeout=self.counters_every_s)
            except queue.Empty:
                self.record_counters()
                continue
            try:
                if item is _STOP:
                    return
                key, kv, tiers, anchor = item
                blobs: dict[tuple, EntryBytes] = {}  # serialised once per secret and codec
                for tier in tiers:
                    form = (tier.secret, tier.codec)
                    if form not in blobs:
                        blobs[form] = serialize_parts(kv, *form)
                    try:
                        if tier.put_bytes(key, blobs[form]):
                            self._moved[tier.name].add("bytes_written", n=blobs[form].nbytes)
                    except Exception:
                        log.exception("store: background write of %s to %s failed", key.digest[:12], tier.name)
                if anchor:
                    self.anchors.add(kv.token_ids.tolist(), key.namespace)
            except Exception:
                log.exception("store: cannot serialise an entry for the slow tiers")
            finally:
                with self._written_cond:
                    self._written += 1
                    self._written_cond.notify_all()

    def flush(self) -> None:
        """Wait until the background writes queued before this call have finished (not those queued meanwhile,
        which another thread may keep adding)."""
        target = self._queued
        with self._written_cond:
            self._written_cond.wait_for(lambda: self._written >= target)

    def contains(self, key: ChunkKey) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def holds(self, key: ChunkKey) -> bool:
        """In a tier of this store that outlives the process (disk, Redis), or in memory if it has no other: what
        a precompute can count as stored."""
        lasting = [t for t in self.tiers if t.name not in ("memory", "peer")] or self.tiers
        return any(tier.contains(key) for tier in lasting)

    def delete(self, key: ChunkKey) -> None:
        for tier in self.tiers:
            tier.delete(key)

    def prefetch(self, keys: Iterable[ChunkKey], expect: KVLayout | None = None) -> Future:
        """Start loading `keys` into the fastest tier in the background (the future resolves to the hit count);
        a `get` of one of them meanwhile waits for this load instead of reading the key again."""
        wanted = list(dict.fromkeys(keys))
        resident = [k for k in wanted if self.tiers[0].contains(k)]
        self.tiers[0].prefetch(resident)  # refresh their LRU position, so they survive until used
        with self._inflight_lock:
            keys = [k for k in wanted if k.digest not in self._inflight and k not in resident]
            future = self._prefetcher.submit(self._load, keys, expect, len(resident))
            for key in keys:
                self._inflight[key.digest] = future
        future.add_done_callback(lambda _: self._settled(keys, future))
        return future

    def _settled(self, keys: list[ChunkKey], future: Future) -> None:
        with self._inflight_lock:
            for key in keys:
                if self._inflight.get(key.digest) is future:
                    del self._inflight[key.digest]

    def _load(self, keys: list[ChunkKey], expect: KVLayout | None, resident: int) -> int:
        """Off the caller's thread: start the disk's readahead of every file, then read the keys as `get_many`
        does (each tier asked once: disk entries read on threads, one Redis MGET) and promote each hit."""
        self.warm(keys)
        return resident + sum(kv is not None for kv in self._read_many(keys, expect))

    def warm(self, keys: Iterable[ChunkKey]) -> None:
        """Ask the tiers whose prefetch serves every process of the host (disk: kernel readahead into the page
        cache) to start reading `keys`; returns at once. What a process that does not serve the KV itself (a
        RAGPipeline beside its vLLM engine) can do for the process that does."""
        keys = list(keys)
        for tier in self.tiers:
            if tier.host_shared_prefetch:
                tier.prefetch(keys)

    def hits(self) -> dict[str, int]:
        """Reads served by each tier so far (cheap counters)."""
        return {tier.name: tier.counters().hits for tier in self.tiers}

    def counters(self) -> dict[str, TierStats]:
        """This process's counters of each tier (cheap: no scan), with the bytes this store read and wrote."""
        moved = {name: counts.snapshot() for name, counts in self._moved.items()}
        return {tier.name: replace(tier.counters(), bytes_read=moved[tier.name].bytes_read,
                                   bytes_written=moved[tier.name].bytes_written) for tier in self.tiers}

    def stats(self) -> dict[str, TierStats]:
        """This process's counters, and what each tier holds (entries and bytes) now."""
        return {tier.name: tier.stats() for tier in self.tiers}

    def record_counters(self) -> None:
        """Add what the tiers counted since the last record to the ledger (no ledger: nothing to do)."""
        if self.ledger is None:
            return
        with self._record_lock:
            now = {tier.name: tier.counters() for tier in self.tiers}
            deltas = {}
            for name, counts in now.items():
                row = {c: getattr(counts, c) - getattr(self._recorded[name], c) for c in COUNTED}
                row = {c: n for c, n in row.items() if n}
                if row:
                    deltas[name] = row
            if deltas:
                self.ledger.add(deltas)
            self._recorded = now

    def totals(self) -> dict[str, TierStats]:
        """Counters summed over every process that recorded into this store's ledger (this one's included),
        with what each tier holds now; without a ledger, this process's stats."""
        stats = self.stats()
        if self.ledger is None:
            return stats
        self.record_counters()
        recorded = self.ledger.read()
        return {name: TierStats(**{**s.as_dict(), **{c: recorded.get(name, {}).get(c, 0) for c in COUNTED}})
                for name, s in stats.items()}

    def close(self) -> None:
        """Finish queued writes, then close the tiers that hold outside resources (the peer tier leaves the
        directory and releases its registered memory)."""
        self.flush()
        self._queue.put(_STOP)
        self._writer.join()
        self._prefetcher.shutdown(wait=True)
        self.record_counters()
        for tier in self.tiers:
            if isinstance(tier, PeerTier):
                tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
