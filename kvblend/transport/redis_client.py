"""Redis clients from kvblend's Redis URLs: one server (`redis://`, `rediss://`, `unix://`) or a Redis Cluster or
Valkey cluster (`redis+cluster://host:port[,host:port...]`, `rediss+cluster://` with TLS; every listed node is a
seed, any live one is enough to learn the slots). A cluster client is opened on first use, and one that cannot
reach any seed is tried again at most every `retry_s`, so a cluster down at start costs misses, never a crash."""

from __future__ import annotations

import threading
import time
from urllib.parse import unquote, urlparse

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)


def is_cluster_url(url: str) -> bool:
    return urlparse(url).scheme in CLUSTER_SCHEMES


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a failing server or cluster raises through redis-py (RedisClusterException is not a RedisError)."""
    import redis

    return redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The (host, port) seeds of a cluster URL; ValueError for one a cluster cannot have (a database other than 0)."""
    parsed = urlparse(url)
    if parsed.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster URL names no database but 0 (redis+cluster://host:port,host:port)")
    seeds = []
    for seed in parsed.netloc.rpartition("@")[2].split(","):
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("a Redis Cluster URL lists its seeds as host:port,host:port")
        seeds.append((host, int(port)))
    return seeds


def _cluster(url: str, timeout_s: float):
    """A RedisCluster on `url`'s seeds; no retries inside a command (a dead shard is a miss, not a wait)."""
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    parsed = urlparse(url)
    username, _, password = parsed.netloc.rpartition("@")[0].partition(":")
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in cluster_seeds(url)],
                        username=unquote(username) or None, password=unquote(password) or None,
                        ssl=CLUSTER_SCHEMES[parsed.scheme] == "rediss", socket_timeout=timeout_s,
                        socket_connect_timeout=timeout_s, require_full_coverage=False, retry=Retry(NoBackoff(), 0))


class RedisConnection:
    """The client for one URL (redis.Redis, or redis.cluster.RedisCluster for a cluster URL), opened on first use."""

    def __init__(self, url: str, timeout_s: float, retry_s: float) -> None:
        self.url, self.timeout_s, self.retry_s = url, timeout_s, retry_s
        self.cluster = is_cluster_url(url)
        self._client = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def get(self):
        """The client; a cluster not reached yet is reached now (ConnectionError if it was tried in the last
        `retry_s`, or the cluster's error if no seed answers)."""
        if self._client is not None:
            return self._client
        import redis

        with self._lock:
            if self._client is None:
                if not self.cluster:
                    self._client = redis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                                        socket_connect_timeout=self.timeout_s)
                elif time.monotonic() < self._next_try:
                    raise redis.exceptions.ConnectionError("the Redis Cluster was unreachable moments ago")
                else:
                    self._next_try = time.monotonic() + self.retry_s
                    self._client = _cluster(self.url, self.timeout_s)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
