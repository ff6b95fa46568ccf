"""What prefetch at retrieval time saves: the time a blended request's chunk KV loading sits on the critical
path (from the moment vLLM schedules the request to the last layer read), on a disk-only and a Redis-only store.

    python -m benchmarks.store prefetch [--tiny] [--chunks 4] [--tokens 512] [--reps 5] [--gap-ms 5 20] [--json OUT]

A request's chunks (random bf16 K/V of SmolLM2-135M's shape: 30 layers, 3 kv heads, head_dim 64) are read
layer by layer as the blend's layer source does in vLLM's worker (every chunk's layer i, then layer i+1, in
line: what it does on a CPU whose cores torch's threads hold), from a fresh memory tier each time, under:
  off         no prefetch: every layer read goes to the slow tier
  scheduling  the scheduler side's prefetch (TieredStore.prefetch) starts right before the first layer read
  retrieval   disk: RAGPipeline's warm (page-cache readahead) `gap` ms before scheduling, then the scheduler's
              prefetch; Redis has nothing a second process can warm, so this equals `scheduling` there
Disk: "cold" drops the entry files from the page cache before each repetition (posix_fadvise DONTNEED),
"warm" leaves them cached. Redis: a private redis-server on loopback (tests/redis_server.py). Medians of `reps`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write  # noqa: E402
from kvblend.store import ChunkKey, ChunkKV, DiskTier, MemoryTier, RedisConfig, RedisTier, TieredStore  # noqa: E402
from kvblend.store.entry import KVLayout  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 30, 3, 64


def chunk(tokens: int, seed: int) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (tokens,), generator=g)
    shape = (LAYERS, tokens, HEADS, HEAD_DIM)
    return ChunkKV(ChunkKey.for_tokens("prefetch-bench", ids.tolist(), "bench"),
                   torch.randn(shape, generator=g).to(torch.bfloat16), torch.randn(shape, generator=g).to(torch.bfloat16),
                   ids)


def drop_page_cache(disk: DiskTier, keys) -> None:
    for key in keys:
        fd = os.open(disk.path(key), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_layers(store: TieredStore, keys, expect: KVLayout) -> None:
    for layer in range(LAYERS):
        for key in keys:
            if store.get(key, layers=(layer,), expect=expect) is None:
                raise RuntimeError(f"chunk {key.digest[:12]} layer {layer} missing")


def trial(slow, keys, expect: KVLayout, mode: str, gap_ms: float, cold: bool) -> float:
    """Milliseconds from scheduling to the last layer read, for one request on a fresh memory tier."""
    store = TieredStore([MemoryTier(1 << 34), slow])
    try:
        if cold:
            drop_page_cache(slow, keys)
        if mode == "retrieval":
            store.warm(keys)
            time.sleep(gap_ms / 1e3)  # the pipeline builds the prompt, vLLM takes the request in
        start = time.perf_counter()
        if mode != "off":
            store.prefetch(keys, expect)
        read_layers(store, keys, expect)
        return (time.perf_counter() - start) * 1e3
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gap-ms", type=float, nargs="*", default=[5.0, 20.0])
    parser.add_argument("--dir", default=None, help="directory for the disk tier (default: a temp dir)")
    parser.add_argument("--json", default=str(result_path("store_prefetch")))
    args = parser.parse_args(argv)
    from redis_server import RedisServer

    kvs = [chunk(args.tokens, seed) for seed in range(args.chunks)]
    keys = [kv.key for kv in kvs]
    expect = KVLayout(LAYERS, HEADS, HEAD_DIM, "bfloat16")
    workdir = Path(tempfile.mkdtemp(prefix="kvblend-prefetch-bench-", dir=args.dir))
    server = RedisServer().start()
    load_before = os.getloadavg()
    rows = []
    try:
        disk = DiskTier(workdir / "disk", 1 << 36)
        redis = RedisTier(RedisConfig(server.url, timeout_s=60.0))
        for kv in kvs:
            assert disk.put(kv.key, kv) and redis.put(kv.key, kv)
        cases = [("disk", "cold", disk, True), ("disk", "warm", disk, False), ("redis", "loopback", redis, False)]
        for tier_name, state, tier, cold in cases:
            modes = [("off", 0.0), ("scheduling", 0.0)]
            if tier_name == "disk":
                modes += [("retrieval", g) for g in args.gap_ms]
            for mode, gap in modes:
                trial(tier, keys, expect, mode, gap, cold)  # warm-up
                samples = [trial(tier, keys, expect, mode, gap, cold) for _ in range(args.reps)]
                rows.append({"tier": tier_name, "state": state, "mode": mode, "gap_ms": gap,
                             "ms": statistics.median(samples), "samples_ms": samples})
                print(f"{tier_name:5s} {state:8s} {mode:10s} gap {gap:5.1f} ms: {statistics.median(samples):8.2f} ms",
                      file=sys.stderr)
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    result = record("store_prefetch", rows, chunks=args.chunks, tokens=args.tokens, reps=args.reps,
                    entry_bytes=kvs[0].nbytes, load_avg_before=load_before, load_avg_after=load_after)
    cpu, sha = result["machine"]["cpu"], result["git_sha"]
    entry_mb = kvs[0].nbytes / 1e6
    print("| store | page cache | prefetch | gap before scheduling | load on the critical path (ms, median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        gap = f"{r['gap_ms']:g} ms" if r["mode"] == "retrieval" else "-"
        print(f"| {r['tier']} | {r['state']} | {r['mode']} | {gap} | {r['ms']:.2f} |")
    print(f"\n{args.chunks} chunks x {args.tokens} tokens ({entry_mb:.1f} MB each), reps={args.reps}, {cpu['model']} "
          f"(ISA {' '.join(cpu['isa'])}), {os.cpu_count()} cpus, load average {load_before[0]:.2f} before / "
          f"{load_after[0]:.2f} after, "
          f"torch {torch.__version__}, python {platform.python_version()}, sha {sha}")
    write(args.json, result)
    return 0


TINY = ["--chunks", "2", "--tokens", "64", "--reps", "1", "--gap-ms", "5", "--json", tiny_out("store_prefetch.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
