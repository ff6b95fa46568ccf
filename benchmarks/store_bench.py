"""Chunk KV store throughput: put / get / 1-layer get per tier (memory, disk, Redis) beside reference ceilings.

    python -m benchmarks.store tiers [--tiny] [--redis URL] [--json OUT] [--reps N] [--dir DIR] [--secret]

Chunks are random bf16 K/V of real model shapes: SmolLM2-135M (30 layers, 3 kv heads, head_dim 64) at 256 and
512 tokens, and Llama-3-8B (32 layers, 8 kv heads, head_dim 128) at 512 tokens. References: a plain memory
copy (torch clone of the same K and V), a plain file of the same serialised bytes (write + fsync, then read
back), and with Redis the same bytes through redis-py (SET, GET) and a raw socket GET (one RESP command, the
reply read with recv_into into a preallocated buffer: what loopback and the server allow, with no client
parsing). Every number is the median of `--reps` timed repetitions after one untimed warm-up. Disk reads
come from the page cache (a file just written is cached), for the tier and the plain file alike.
Without --redis a private redis-server is started on a free port (tests/redis_server.py) if one is installed.
--secret gives the disk and Redis tiers a deployment secret (entries with a keyed MAC).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.harness import record, result_path, timed, tiny_out, with_tiny, write  # noqa: E402
from kvblend.store import ChunkKey, ChunkKV, DiskTier, MemoryTier, RedisConfig, RedisTier  # noqa: E402
from kvblend.store.entry import serialize  # noqa: E402

CHUNKS = {
    # name: (layers, kv_heads, head_dim, tokens)
    "SmolLM2 256 tok": (30, 3, 64, 256),
    "SmolLM2 512 tok": (30, 3, 64, 512),
    "Llama-3-8B 512 tok": (32, 8, 128, 512),
}
COLUMNS = ["memory tier", "disk tier", "redis tier", "memory copy (clone)", "plain file", "redis-py SET/GET",
           "raw socket GET"]
SECRET = b"store-bench-deployment-secret-0123"


@dataclass
class Result:
    chunk: str
    op: str  # put | get | get 1 layer
    impl: str  # one of COLUMNS
    kv_bytes: int  # K+V bytes the op moves (the whole entry, or one layer)
    ms: float  # median
    samples_ms: list[float]
    copies: bool = True  # False: the memory tier keeps references, so no bytes are copied

    @property
    def gbps(self) -> float:
        return self.kv_bytes / (self.ms / 1e3) / 1e9


def random_chunk(layers: int, heads: int, head_dim: int, tokens: int, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (tokens,), generator=g)
    key = ChunkKey.for_tokens("store-bench", ids.tolist(), "bench")
    shape = (layers, tokens, heads, head_dim)
    k = torch.randn(shape, generator=g).to(torch.bfloat16)
    v = torch.randn(shape, generator=g).to(torch.bfloat16)
    return ChunkKV(key, k, v, ids)


def must(value, what: str):
    if value is None or value is False:
        raise RuntimeError(f"{what} failed")
    return value


def bench_references(name: str, kv: ChunkKV, workdir: Path, reps: int) -> list[Result]:
    blob = serialize(kv)
    path = workdir / "plain.bin"

    def write() -> None:
        with open(path, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())

    def read() -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    clone = timed(lambda: (kv.k.clone(), kv.v.clone()), reps)
    wr = timed(write, reps)
    rd = timed(read, reps)
    path.unlink()
    n = kv.nbytes
    return [
        Result(name, "put", "memory copy (clone)", n, statistics.median(clone), clone),
        Result(name, "get", "memory copy (clone)", n, statistics.median(clone), clone),
        Result(name, "put", "plain file", n, statistics.median(wr), wr),
        Result(name, "get", "plain file", n, statistics.median(rd), rd),
    ]


def bench_redis_references(name: str, kv: ChunkKV, url: str, prefix: str, reps: int) -> list[Result]:
    """The serialised entry through redis-py (SET, GET), and a GET whose reply a raw socket reads."""
    import redis

    blob = serialize(kv)
    client = redis.Redis.from_url(url, socket_timeout=60)
    name_ = f"{prefix}reference"
    put = timed(lambda: client.set(name_, blob), reps)
    get = timed(lambda: must(client.get(name_), "redis GET"), reps)
    where = urlparse(url)
    sock = socket.create_connection((where.hostname, where.port or 6379))
    command = f"*2\r\n$3\r\nGET\r\n${len(name_)}\r\n{name_}\r\n".encode()
    buf = np.empty(len(blob) + 64, dtype=np.uint8)

    def raw_get() -> None:
        sock.sendall(command)
        view, got, want = memoryview(buf), 0, None
        while want is None or got < want:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise RuntimeError("redis closed the connection")
            got += n
            if want is None and b"\r\n" in bytes(view[: min(got, 32)]):
                head = bytes(view[:32])
                end = head.index(b"\r\n")
                want = end + 2 + int(head[1:end]) + 2

    raw = timed(raw_get, reps)
    sock.close()
    client.delete(name_)
    client.close()
    n = kv.nbytes
    return [
        Result(name, "put", "redis-py SET/GET", n, statistics.median(put), put),
        Result(name, "get", "redis-py SET/GET", n, statistics.median(get), get),
        Result(name, "get", "raw socket GET", n, statistics.median(raw), raw),
    ]


def bench_tier(name: str, kv: ChunkKV, tier, impl: str, reps: int) -> list[Result]:
    layer = kv.k.shape[0] // 2
    put = timed(lambda: must(tier.put(kv.key, kv), f"{impl} put"), reps)
    get = timed(lambda: must(tier.get(kv.key), f"{impl} get"), reps)
    one = timed(lambda: must(tier.get(kv.key, [layer]), f"{impl} 1-layer get"), reps)
    copies = impl != "memory tier"
    n, n1 = kv.nbytes, kv.nbytes // kv.k.shape[0]
    tier.delete(kv.key)
    return [
        Result(name, "put", impl, n, statistics.median(put), put, copies),
        Result(name, "get", impl, n, statistics.median(get), get, copies),
        Result(name, "get 1 layer", impl, n1, statistics.median(one), one, copies),
    ]


def cell(r: Result | None) -> str:
    if r is None:
        return "–"
    if not r.copies:
        return f"{r.ms:.3f} ms (no copy)"
    return f"{r.ms:.2f} ms ({r.gbps:.2f} GB/s)"


def table(results: list[Result]) -> str:
    index = {(r.chunk, r.op, r.impl): r for r in results}
    lines = [
        "| chunk | MiB | op | " + " | ".join(COLUMNS) + " |",
        "|---|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for name in CHUNKS:
        sizes = [r.kv_bytes for r in results if r.chunk == name and r.op == "put"]
        if not sizes:
            continue
        for op in ("put", "get", "get 1 layer"):
            cells = [cell(index.get((name, op, impl))) for impl in COLUMNS]
            lines.append(f"| {name} | {sizes[0] / 2**20:.1f} | {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[str]:
    index = {(r.chunk, r.op, r.impl): r for r in results}
    pairs = [
        ("disk tier", "put", "plain file", "put", "disk put / plain file write+fsync"),
        ("disk tier", "get", "plain file", "get", "disk get / plain file read"),
        ("redis tier", "put", "plain file", "put", "redis put / plain file write+fsync"),
        ("redis tier", "get", "plain file", "get", "redis get / plain file read"),
        ("redis tier", "get", "raw socket GET", "get", "redis get / raw socket GET"),
        ("disk tier", "get 1 layer", "disk tier", "get", "disk 1-layer get / disk whole get"),
        ("redis tier", "get 1 layer", "redis tier", "get", "redis 1-layer get / redis whole get"),
    ]
    out = []
    for name in CHUNKS:
        parts = []
        for a_impl, a_op, b_impl, b_op, label in pairs:
            a, b = index.get((name, a_op, a_impl)), index.get((name, b_op, b_impl))
            if a and b:
                parts.append(f"{label} = {a.ms / b.ms:.2f}x")
        if parts:
            out.append(f"- {name}: " + "; ".join(parts))
    return out


def open_redis(url: str | None, secret: bytes | None):
    """(RedisTier, cleanup) for `url`, or for a private redis-server; (None, reason) if neither works."""
    prefix = f"kvblend-bench:{uuid.uuid4().hex[:8]}:"
    server = None
    if url is None:
        try:
            from redis_server import RedisServer

            server = RedisServer().start()
            url = server.url
        except Exception as exc:  # no redis-server installed, or it would not start
            return None, f"no Redis: {exc}"
    config = RedisConfig(url, prefix=prefix, timeout_s=60.0, retry_s=0.0)
    tier = RedisTier(config) if secret is None else RedisTier(config, secret)
    if not tier.available:
        if server:
            server.close()
        return None, f"Redis at {url} does not answer"
    return tier, (server, url)


def redis_parser() -> str:
    """hiredis (C) when installed, else redis-py's pure-Python parser."""
    try:
        import hiredis

        return f"hiredis {hiredis.__version__}"
    except ImportError:
        return "python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", help="redis://host:port/db (default: start a private redis-server)")
    parser.add_argument("--json", default=str(result_path("store_tiers")), help="write the raw results here")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", help="directory for the disk tier and the plain file (default: a temp dir)")
    parser.add_argument("--chunks", nargs="*", default=list(CHUNKS), choices=list(CHUNKS))
    parser.add_argument("--secret", action="store_true", help="authenticated entries (a keyed MAC per entry)")
    args = parser.parse_args(argv)
    secret = SECRET if args.secret else None

    workdir = Path(tempfile.mkdtemp(prefix="kvblend-store-bench-", dir=args.dir))
    redis_tier, redis_info = open_redis(args.redis, secret)
    load_before = os.getloadavg()
    results: list[Result] = []
    try:
        for name in args.chunks:
            kv = random_chunk(*CHUNKS[name])
            results += bench_references(name, kv, workdir, args.reps)
            results += bench_tier(name, kv, MemoryTier(1 << 34), "memory tier", args.reps)
            disk = DiskTier(workdir / "disk", 1 << 36) if secret is None else DiskTier(workdir / "disk", 1 << 36, secret)
            results += bench_tier(name, kv, disk, "disk tier", args.reps)
            if redis_tier is not None:
                results += bench_tier(name, kv, redis_tier, "redis tier", args.reps)
                results += bench_redis_references(name, kv, redis_info[1], redis_tier.config.prefix, args.reps)
            print(f"done: {name}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if redis_tier is not None:
            server, _ = redis_info
            if server:
                server.close()
    load_after = os.getloadavg()

    print(table(results))
    print()
    print("\n".join(ratios(results)))
    redis_note = f"redis: {redis_info[1]}, parser {redis_parser()}" if redis_tier is not None else redis_info
    result = record("store_tiers", [{**asdict(r), "gbps": r.gbps} for r in results], reps=args.reps,
                    secret=bool(secret), redis_parser=redis_parser() if redis_tier is not None else None,
                    load_avg_before=load_before, load_avg_after=load_after,
                    redis=None if redis_tier is None else redis_info[1])
    cpu = result["machine"]["cpu"]
    print(f"\nreps={args.reps} (median), torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cpus ({cpu['model']}; ISA {' '.join(cpu['isa'])}), "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after, "
          f"secret {'on' if secret else 'off'}, {redis_note}")
    write(args.json, result)
    return 0


TINY = ["--reps", "1", "--chunks", "SmolLM2 256 tok", "--json", tiny_out("store_tiers.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
