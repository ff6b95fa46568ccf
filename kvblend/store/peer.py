"""Peer tier: chunk entries held by other live kvblend instances, found through the Redis directory and read
over NIXL (kvblend.transport, the layer below the store).

Every entry this instance stores is exported (its serialised, digest- or MAC-carrying bytes, in NIXL-registered
host memory under `peer_bytes`) and announced. On a miss in the faster tiers the directory names the live
holders; each is read with a bounded timeout and the entry verified exactly as a Redis or disk entry is. A dead,
slow or lying peer costs at most its timeout and is skipped for `retry_s`; the next holder, then the next tier.
An export is never changed in place (a rewrite is a new buffer; the old one stays readable for the endpoint's
`retire_s`), so a read racing a rewrite gets the old or the new entry whole: a bad entry is bad on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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
from kvblend.transport import BlobRecord, NixlEndpoint, PeerDirectory, TransferFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerConfig:
    """How this instance joins the peer directory and how long it waits on a peer."""

    directory_url: str
    instance: str
    max_bytes: int
    timeout_s: float
    ttl_s: float
    max_holders: int = 3  # holders tried per miss: the miss costs at most max_holders * timeout_s
    retry_s: float = 10.0  # a peer that failed is skipped this long

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.ttl_s <= 0 or self.max_holders <= 0:
            raise ValueError(f"peer budget, timeout, TTL and holder count must be positive: {self}")


class PeerTier:
    name = "peer"
    synchronous = False
    host_shared_prefetch = False  # nothing to warm (see `prefetch`)

    def __init__(self, config: PeerConfig, secret: str | bytes | None = None, codec: str = "full") -> None:
        self.config, self.secret, self.codec = config, entry_secret(secret), entry_codec(codec)
        self.max_bytes = config.max_bytes
        self.endpoint = NixlEndpoint(config.instance, config.max_bytes)
        self.directory = PeerDirectory(config.directory_url, config.instance, config.ttl_s, config.timeout_s)
        self.directory.join(self.endpoint.connection_info())
        self._failed: dict[str, float] = {}  # instance -> time it may be tried again
        self.counts = TierCounters()
        self._lock = threading.Lock()

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None) -> ChunkKV | None:
        """This instance's own export, else the first live holder that returns a valid entry in time."""
        own = self.endpoint.local(key.digest)
        if own is not None:
            try:
                kv = self._verify(own, key, layers, expect, "this instance")
            except EntryError as exc:
                log.warning("peer tier: own export of %s is bad (%s); withdrawing it", key.digest[:12], exc)
                self.counts.add("corrupt")
                if self.endpoint.withdraw(key.digest, own):  # an export is never rewritten in place: a newer one stays
                    self.directory.withdraw([key.digest])
                kv = None
            if kv is not None:
                return self._hit(kv)
        for holder in self._candidates(key):
            try:
                record = BlobRecord.from_bytes(holder.record)
                kv = self.endpoint.read(record, holder.connection_info, self.config.timeout_s,
                                        lambda blob, source=holder.instance: self._verify(blob, key, layers, expect, source))
            except EntryError as exc:  # moved intact but not a valid entry: that peer is not trusted for a while
                log.warning("peer tier: bad entry %s from %s (%s); skipping it for %.0fs",
                            key.digest[:12], holder.instance, exc, self.config.retry_s)
                self.counts.add("corrupt")
                self._skip(holder.instance)
                continue
            except (TransferFailed, ValueError) as exc:
                log.warning("peer tier: %s failed for %s (%s); skipping it for %.0fs",
                            holder.instance, key.digest[:12], exc, self.config.retry_s)
                self.counts.add("errors")
                self._skip(holder.instance)
                continue
            if kv is not None:
                return self._hit(kv)
        self.counts.add("misses")
        return None

    def get_many(self, keys: Sequence[ChunkKey], expect: KVLayout | None = None) -> list[ChunkKV | None]:
        """Whole entries of `keys`, one `get` each: every key may have other holders, each read is its own
        bounded transfer."""
        return [self.get(key, None, expect) for key in keys]

    def _skip(self, instance: str) -> None:
        with self._lock:
            self._failed[instance] = time.monotonic() + self.config.retry_s

    def _candidates(self, key: ChunkKey) -> list:
        now = time.monotonic()
        with self._lock:
            self._failed = {inst: until for inst, until in self._failed.items() if until > now}
            skip = set(self._failed)
        return [h for h in self.directory.holders(key.digest) if h.instance not in skip][: self.config.max_holders]

    def _verify(self, blob: memoryview, key: ChunkKey, layers, expect, source: str) -> ChunkKV | None:
        """The entry in `blob`, verified (digests or MAC, key, layout); None if this reader cannot accept it
        (another deployment secret, fewer layers than asked); EntryError if it is bad."""
        try:
            return read_entry(BytesSource(blob), key, layers, len(blob), expect, self.secret)
        except EntryRefused as exc:
            log.warning("peer tier: refusing entry %s from %s: %s", key.digest[:12], source, exc)
            self.counts.add("corrupt")
            return None

    def _hit(self, kv: ChunkKV) -> ChunkKV:
        self.counts.add("hits")
        return kv

    def put(self, key: ChunkKey, kv: ChunkKV) -> bool:
        return self.put_bytes(key, serialize_parts(kv, self.secret, self.codec))

    def put_bytes(self, key: ChunkKey, blob: bytes | EntryBytes) -> bool:
        """Export the entry and announce it; entries evicted to make room are withdrawn."""
        try:
            record, evicted = self.endpoint.export(key.digest, b"".join(entry_parts(blob)))
        except Exception:
            log.exception("peer tier: cannot export %s", key.digest[:12])
            self.counts.add("errors")
            return False
        self.directory.withdraw(evicted)
        self.counts.add("evictions", n=len(evicted))
        if record is None:
            return False
        self.directory.announce(key.digest, record.to_bytes())
        self.counts.add("puts")
        return True

    def contains(self, key: ChunkKey) -> bool:
        return self.endpoint.local(key.digest) is not None or self.directory.holds(key.digest)

    def delete(self, key: ChunkKey) -> None:
        """Stop exporting this instance's copy (other instances' copies are theirs)."""
        self.endpoint.withdraw(key.digest)
        self.directory.withdraw([key.digest])

    def prefetch(self, keys: Iterable[ChunkKey]) -> None:
        """Nothing to warm: a peer read is one transfer, done when the entry is asked for."""

    def counters(self) -> TierStats:
        return self.counts.snapshot()

    def stats(self) -> TierStats:
        return self.counts.snapshot(len(self.endpoint.exported()), self.endpoint.exported_bytes())

    def close(self) -> None:
        """Leave the directory (withdrawing every export) and release the registered memory."""
        self.directory.leave(self.endpoint.exported())
        self.endpoint.close()
