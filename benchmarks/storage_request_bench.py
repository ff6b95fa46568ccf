"""What one storage-mode request costs kvblend outside vLLM's forward: the scheduler's look-up of the prompt's
prefix-chained spans, the worker's copy of N stored spans into vLLM's paged cache, and the extraction of N
freshly prefilled spans into the store (its synchronous part, then the background writes).

    python benchmarks/storage_request_bench.py [--spans 1 4 28] [--reps 7] [--json ...]

Store level, no engine: kvblend's SchedulerSide and WorkerSide as vLLM's connector runs them, on one CPU attention
layer per model layer equipped as vLLM's CPU backend equips it (tests/vllm_helpers.py `cpu_attention_layers`: its
cache-update op, `cpu_attn_reshape_and_cache`) and a real paged cache each. SmolLM2-135M's KV shape in float32, spans of 128 tokens,
vLLM's CPU block size 128. Sources of a load: the memory tier (hit), the disk tier alone (page cache warm, a
fresh memory tier), Redis alone (a private redis-server on loopback). Every load is checked once against the
stored K/V read back from the paged cache before timing. Median of --reps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
SPAN, BLOCK, TAIL = 128, 128, 40


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, nargs="+", default=[1, 4, 28])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", default="benchmarks/results/storage_request_bench.json")
    args = parser.parse_args()
    import torch
    from redis_server import RedisServer
    from store_bench import timed
    from vllm_helpers import cpu_attention_layers

    from kvblend.cpu import cpu_record
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.spec import load_spec
    from kvblend.store import open_store
    from kvblend.store.entry import ChunkKV
    from kvblend.store.memory import MemoryTier
    from kvblend.vllm.config import ConnectorConfig
    from kvblend.vllm.metadata import SaveJob
    from kvblend.vllm.scheduler import SchedulerSide, prefix_spans
    from kvblend.vllm.worker import WorkerSide

    spec = load_spec(embedded_model_dir(), "float32")
    gen = torch.Generator().manual_seed(0)
    server = RedisServer().start()
    rows, started = [], time.time()
    load_before = os.getloadavg()
    for n in args.spans:
        prompt = torch.randint(0, 40000, (n * SPAN + TAIL,), generator=gen).tolist()
        num_blocks = (len(prompt) + BLOCK - 1) // BLOCK
        block_ids = list(range(1, num_blocks + 1))
        layers, kv_caches = cpu_attention_layers(spec.num_layers, num_blocks + 1, BLOCK, spec.num_kv_heads,
                                                 spec.head_dim, spec.torch_dtype)
        with tempfile.TemporaryDirectory(prefix="kvblend-reqbench-") as disk_dir:
            base = dict(mode="storage", span_tokens=SPAN, memory_gb=1.0, store_dir=disk_dir, redis_url=server.url)
            sources = {"memory": base, "disk": base, "redis": {**base, "disk": False, "store_dir": None}}
            config = ConnectorConfig(**base)
            writer = open_store(config.store_config())
            spans = prefix_spans(spec.fingerprint, prompt, SPAN, config.namespace)
            entries = {}
            for span in spans:
                shape = (spec.num_layers, SPAN, spec.num_kv_heads, spec.head_dim)
                k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
                entries[span.key.digest] = (k, v)
                writer.put(span.key, ChunkKV(span.key, k, v, torch.tensor(prompt[span.start : span.end]),
                                             base_position=span.start))
            writer.close()
            row = {"spans": n, "prompt_tokens": len(prompt)}
            for source, settings in sources.items():
                config = ConnectorConfig(**settings)
                store = open_store(config.store_config())
                scheduler = SchedulerSide(config, spec.fingerprint, store)
                worker = WorkerSide(spec, SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK)), None, store,
                                    layers, blend=False)
                worker.register(kv_caches)

                def lookup():
                    scheduler.matched_tokens("r", prompt, {"kvblend": {"mode": "storage"}}, 0)
                    scheduler.after_alloc("r", block_ids, n * SPAN)
                    scheduler._plan_extraction("r", prompt, block_ids, n * SPAN)
                    return scheduler.build_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                                                scheduled_cached_reqs=SimpleNamespace(req_ids=[])))

                def load():
                    if source != "memory":
                        store.tiers[0] = MemoryTier(store.tiers[0].max_bytes)  # empty: the slow tier is read
                    meta = lookup()
                    worker.start_load(meta)
                    for name in layers:
                        worker.wait_layer(name)
                    if worker.take_failed_blocks():
                        raise SystemExit(f"{source}: a span failed to load")

                load()
                for i, span in enumerate(spans):  # what the paged cache holds is what was stored
                    slots = torch.arange(span.start, span.end) + BLOCK  # block_ids start at 1
                    for li, cache in enumerate(worker.caches):
                        k, v = cache.read(slots)
                        want_k, want_v = entries[span.key.digest]
                        if not (torch.equal(k, want_k[li]) and torch.equal(v, want_v[li])):
                            raise SystemExit(f"{source}: span {i} layer {li} differs after the load")
                if source == "memory":
                    row["lookup_ms"] = timed(lookup, args.reps)
                row[f"load_{source}_ms"] = timed(load, args.reps)
                if source == "memory":
                    save = SaveJob("s", prompt, block_ids, spans)
                    syncs, flushes = [], []
                    for rep in range(args.reps + 1):  # the slow tiers' writes finish before the next save starts
                        start = time.perf_counter()
                        worker._save(save)
                        middle = time.perf_counter()
                        store.flush()
                        if rep:
                            syncs.append((middle - start) * 1e3)
                            flushes.append((time.perf_counter() - middle) * 1e3)
                    row["save_sync_ms"], row["save_flush_ms"] = syncs, flushes
                store.close()
            rows.append(row)
            print({k: (round(statistics.median(v), 1) if isinstance(v, list) else v) for k, v in row.items()},
                  flush=True)
    server.close()
    report = {
        "cpu": cpu_record(), "torch_threads": torch.get_num_threads(),
        "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": "python " + " ".join(sys.argv),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print("\n| spans | lookup ms | load: memory ms | load: disk ms | load: Redis ms | save (sync) ms | save flush ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [statistics.median(row[c]) for c in ("lookup_ms", "load_memory_ms", "load_disk_ms", "load_redis_ms",
                                                     "save_sync_ms", "save_flush_ms")]
        print(f"| {row['spans']} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
