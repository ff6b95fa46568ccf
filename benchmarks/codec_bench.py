"""Storage codecs: bytes per entry, chunks per GB, and disk / Redis put and get per codec, on the same chunks.

    python -m benchmarks.store codecs [--tiny] [--redis URL] [--json OUT] [--reps N] [--chunks NAME ...]

Chunks as in store_bench.py (random bf16 K/V of SmolLM2-135M and Llama-3-8B shapes). Per codec (full = the
model's bf16, fp8, int4): the serialised entry's bytes and how many fit in a GB against full; put (encode,
digest, write) and get of a whole entry decoded back to bf16 on the CPU (what TieredStore.get hands out), and a
1-layer get, each through the disk tier (page cache) and the Redis tier (a private redis-server unless --redis).
GB/s are bf16 bytes delivered per second (the model-dtype KV the blend receives), the median of --reps after a
warm-up. Fidelity is `kvblend eval fidelity --codec` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from benchmarks.harness import record, result_path, timed, tiny_out, with_tiny, write  # noqa: E402
from benchmarks.store_bench import CHUNKS, must, open_redis, random_chunk  # noqa: E402
from kvblend.store import DiskTier, RedisTier  # noqa: E402
from kvblend.store.entry import CODECS, serialize  # noqa: E402


def bench(kv, tier, reps: int) -> dict[str, float]:
    """Median ms of put, whole get decoded to the model dtype, and 1-layer get decoded."""
    layer = kv.k.shape[0] // 2
    put = timed(lambda: must(tier.put(kv.key, kv), "put"), reps)
    get = timed(lambda: must(tier.get(kv.key), "get").decoded(), reps)
    one = timed(lambda: must(tier.get(kv.key, [layer]), "1-layer get").decoded(), reps)
    tier.delete(kv.key)
    return {"put_ms": statistics.median(put), "get_ms": statistics.median(get), "get1_ms": statistics.median(one)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", help="redis://host:port/db (default: start a private redis-server)")
    parser.add_argument("--json", default=str(result_path("store_codecs")), help="write the raw results here")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunks", nargs="*", default=list(CHUNKS), choices=list(CHUNKS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="kvblend-codec-bench-"))
    redis, info = open_redis(args.redis, None)
    load_before = os.getloadavg()
    rows = []
    try:
        for name in args.chunks:
            kv = random_chunk(*CHUNKS[name])
            full_bytes = len(serialize(kv))
            for codec in CODECS:
                entry = len(serialize(kv, None, codec))
                row = {"chunk": name, "codec": codec, "entry_bytes": entry, "kv_bf16_bytes": kv.nbytes,
                       "chunks_per_gb_vs_full": full_bytes / entry}
                disk = DiskTier(workdir / codec, 1 << 36, codec=codec)
                row.update({f"disk_{k}": v for k, v in bench(kv, disk, args.reps).items()})
                if redis is not None:
                    tier = RedisTier(redis.config, codec=codec)
                    row.update({f"redis_{k}": v for k, v in bench(kv, tier, args.reps).items()})
                rows.append(row)
                print(f"done: {name} {codec}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if redis is not None and info[0]:
            info[0].close()
    load_after = os.getloadavg()

    def gbps(row, key, nbytes):
        return f"{row[key]:.1f} ms ({nbytes / row[key] / 1e6:.2f})"

    tiers = ["disk"] + (["redis"] if redis is not None else [])
    head = "| chunk | codec | entry MiB | chunks/GB vs full |" + "".join(
        f" {t} put | {t} get | {t} 1-layer get |" for t in tiers)
    print(head)
    print("|---|---|---:|---:|" + "---:|" * (3 * len(tiers)))
    for row in rows:
        layer_bytes = row["kv_bf16_bytes"] // CHUNKS[row["chunk"]][0]
        cells = "".join(f" {gbps(row, f'{t}_put_ms', row['kv_bf16_bytes'])} | {gbps(row, f'{t}_get_ms', row['kv_bf16_bytes'])}"
                        f" | {gbps(row, f'{t}_get1_ms', layer_bytes)} |" for t in tiers)
        print(f"| {row['chunk']} | {row['codec']} | {row['entry_bytes'] / 2**20:.2f} | "
              f"{row['chunks_per_gb_vs_full']:.2f}x |{cells}")
    result = record("store_codecs", rows, reps=args.reps, load_avg_before=load_before, load_avg_after=load_after)
    cpu = result["machine"]["cpu"]
    print(f"\nreps={args.reps} (median; GB/s of bf16 KV delivered in brackets), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} cpus ({cpu['model']}; ISA {' '.join(cpu['isa'])}), load average "
          f"{load_before[0]:.2f} before / {load_after[0]:.2f} after, redis: {info[1] if redis else info}")
    write(args.json, result)
    return 0


TINY = ["--reps", "1", "--chunks", "SmolLM2 256 tok", "--json", tiny_out("store_codecs.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
