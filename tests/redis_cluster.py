"""A private, real Redis Cluster for tests (and the store benchmark): 3 masters and 3 replicas on free loopback
ports (redis-server with redis_cluster.conf, then redis-cli --cluster create). No persistence, no mocks."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

from redis_server import RedisServer

CONF = Path(__file__).with_name("redis_cluster.conf")  # the cluster settings of every node (.ci/run's too)


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too, both below the ephemeral range."""
    while True:
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


class RedisCluster:
    """`masters` masters, each with `replicas` replicas, on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.nodes = [RedisServer(cluster_port(), extra_args=("--include", str(CONF))) for _ in range(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """The cluster URL kvblend takes: every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self, wait_s: float = 30.0) -> "RedisCluster":
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok(wait_s)
        return self

    def wait_ok(self, wait_s: float = 30.0) -> None:
        """Wait until every running node reports cluster_state:ok and agrees on the masters."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            states = [self._state(node) for node in self.nodes if node.running]
            if all(state in ("ok", "no answer") for state in states) and "ok" in states:  # a hung node answers nothing
                return
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {wait_s}s: {[self._state(n) for n in self.nodes]}")

    def _state(self, node: RedisServer) -> str:
        client = node.client(timeout_s=1.0)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            info = info.decode() if isinstance(info, bytes) else info
            return dict(line.split(":", 1) for line in info.split() if ":" in line).get("cluster_state", "?")
        except Exception:  # noqa: BLE001 - a node that does not answer (hung, or not listening yet)
            return "no answer"
        finally:
            client.close()

    def master_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot now."""
        client = self.masters()[0].client()
        try:
            slot = client.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(node for node in self.nodes if node.port == master[1])
        finally:
            client.close()
        raise RuntimeError(f"no master serves {key!r}")

    def masters(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running and self._role(node) == "master"]

    def has_replica(self, node: RedisServer) -> bool:
        """Whether the master `node` has a replica connected."""
        client = node.client(timeout_s=1.0)
        try:
            return bool(client.execute_command("ROLE")[2])
        finally:
            client.close()

    def _role(self, node: RedisServer) -> str:
        client = node.client(timeout_s=1.0)
        try:
            return client.execute_command("ROLE")[0].decode()
        except Exception:  # noqa: BLE001 - a hung node has no role anyone can use
            return "unreachable"
        finally:
            client.close()

    def wait_failover(self, dead: RedisServer, wait_s: float = 30.0) -> None:
        """Wait until a replica has taken over the slots of the stopped master `dead` and the cluster is ok."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if len(self.masters()) == len(self.nodes) // (1 + self.replicas):
                break
            time.sleep(0.1)
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def kill(self, node: RedisServer) -> None:
        """SIGKILL `node`: it dies at once, as a crashed host's would, without handing anything over."""
        node.resume()
        node.proc.kill()
        node.proc.wait()
        node.proc = None

    def replicate(self) -> None:
        """Wait until every master's writes so far have reached its replicas (replication is asynchronous)."""
        for node in self.masters():
            client = node.client(timeout_s=10.0)
            try:
                replicas = len(client.execute_command("ROLE")[2])
                if replicas:
                    client.execute_command("WAIT", replicas, 5000)
            finally:
                client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
