"""The peer directory in Redis: which live instance holds which blob.

`<prefix>peer:<instance>` holds an instance's NIXL connection info with a TTL that its heartbeat thread renews
every ttl/3; an instance that stops renewing (killed, hung, partitioned) drops out when the TTL runs out.
`<prefix>holders:<name>` is a hash from instance to that instance's blob record. A lookup returns only the
holders whose peer key is alive and deletes the fields of the dead ones, so the directory forgets a dead peer.
Redis being down makes every lookup empty and every announcement a no-op (logged once), never an error.
On a Redis Cluster (`redis+cluster://` URL) every key is one slot's; a lookup reads the holders' peer keys slot
by slot, and a dead shard makes the lookups of its keys empty while the other shards answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kvblend.transport.redis_client import RedisConnection, redis_errors

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Holder:
    """A live instance holding a blob: its name, its connection info and its record of the blob."""

    instance: str
    connection_info: bytes
    record: bytes


class PeerDirectory:
    """One instance's view of the directory: its own heartbeat, its announcements, lookups of the others."""

    def __init__(self, url: str, instance: str, ttl_s: float, timeout_s: float, prefix: str = "kvblend:") -> None:
        if ttl_s <= 0 or timeout_s <= 0:
            raise ValueError(f"directory TTL and timeout must be positive, got {ttl_s} and {timeout_s}")
        self.instance, self.ttl_s, self.prefix = instance, ttl_s, prefix
        self._connection = RedisConnection(url, timeout_s, retry_s=ttl_s / 3)
        self._errors = redis_errors()
        self._down = False
        self._connection_info: bytes | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def client(self):
        """redis.Redis, or redis.cluster.RedisCluster for a cluster URL."""
        return self._connection.get()

    def _peer(self, instance: str) -> str:
        return f"{self.prefix}peer:{instance}"

    def _holders(self, name: str) -> str:
        return f"{self.prefix}holders:{name}"

    def _call(self, what: str, fn: Callable[[], T], default: T) -> T:
        """Run a Redis command; on failure log the outage once and return `default`."""
        try:
            result = fn()
        except self._errors as exc:
            if not self._down:
                log.warning("peer directory unavailable during %s (%s): no peers until it answers", what, exc)
            self._down = True
            return default
        if self._down:
            log.warning("peer directory is reachable again")
            self._down = False
        return result

    def join(self, connection_info: bytes) -> None:
        """Publish this instance as alive and keep it so (heartbeat thread) until `leave`."""
        self._connection_info = connection_info
        self._beat()
        self._heartbeat = threading.Thread(target=self._beat_loop, name="kvblend-peer-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        self._call("heartbeat", lambda: self.client.set(self._peer(self.instance), self._connection_info,
                                                        px=int(self.ttl_s * 1000)), None)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self._beat()

    def announce(self, name: str, record: bytes) -> None:
        self._call("announce", lambda: self.client.hset(self._holders(name), self.instance, record), 0)

    def withdraw(self, names: list[str]) -> None:
        if not names:
            return
        def run():
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hdel(self._holders(name), self.instance)
            return pipe.execute()

        self._call("withdraw", run, None)

    def holders(self, name: str) -> list[Holder]:
        """The live instances other than this one that hold `name` (dead ones are removed on the way)."""
        fields = self._call("lookup", lambda: self.client.hgetall(self._holders(name)), {})
        others = [(inst.decode(), rec) for inst, rec in fields.items() if inst.decode() != self.instance]
        if not others:
            return []
        peers = [self._peer(inst) for inst, _ in others]
        infos = self._call("lookup", lambda: self._mget(peers), None)
        if infos is None:
            return []
        dead = [inst for (inst, _), info in zip(others, infos) if info is None]
        if dead:
            self._call("prune", lambda: self.client.hdel(self._holders(name), *dead), 0)
            log.info("peer directory: %s no longer alive, dropped as holder of %s", dead, name[:12])
        return [Holder(inst, info, rec) for (inst, rec), info in zip(others, infos) if info is not None]

    def _mget(self, keys: list[str]) -> list:
        """MGET, on a cluster one per slot (the peer keys of several instances are in several slots)."""
        if self._connection.cluster:
            return self.client.mget_nonatomic(keys)
        return self.client.mget(keys)

    def holds(self, name: str) -> bool:
        return bool(self.holders(name))

    def live_peers(self) -> list[str]:
        """Every instance whose heartbeat is current, this one included."""
        start = len(self._peer(""))
        keys = self._call("scan", lambda: list(self.client.scan_iter(self._peer("*"))), [])
        return sorted({key.decode()[start:] for key in keys})

    def leave(self, withdrawn: list[str]) -> None:
        """Stop the heartbeat, withdraw `withdrawn` and remove this instance's peer key."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=self.ttl_s)
        self.withdraw(withdrawn)
        self._call("leave", lambda: self.client.delete(self._peer(self.instance)), 0)
        self._connection.close()
