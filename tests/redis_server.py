"""A private, real redis-server for tests (and the store benchmark): start on a free loopback port, stop,
restart on the same port, pause (SIGSTOP, a hung server) and resume. No persistence, no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = "redis-server"


class RedisServerMissing(RuntimeError):
    """redis-server is not installed: the store tests need a real one (apt-get install redis-server)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    path = shutil.which(REDIS_SERVER)
    if path is None:
        raise RedisServerMissing(
            "redis-server is not on PATH; the store tests run against a real Redis server. "
            "Install it (apt-get install redis-server) or run the tests through .ci/run."
        )
    return path


def ping(url: str, timeout_s: float = 0.5) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, without RDB or AOF persistence."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.workdir: Path | None = None  # created by start(), once redis-server is known to exist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait_s: float = 10.0) -> "RedisServer":
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        binary = redis_server_binary()
        self.workdir = self.workdir or Path(tempfile.mkdtemp(prefix="kvblend-redis-"))
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir), *self.extra_args]
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            if ping(self.url, timeout_s=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {wait_s}s: {self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM; it exits at once since it persists nothing) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> "RedisServer":
        """Stop and start again on the same port (the data is gone: nothing is persisted)."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but answers nothing, like a hung or overloaded server."""
        if self.running:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)

    def client(self, timeout_s: float = 5.0):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def log_tail(self, n: int = 2000) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "redis.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
