"""Suite `store`: the chunk KV store on its own (no engine), on the CPU.

    python -m benchmarks.store [PART] [--tiny] [ARGS]      # no PART: every part in turn

Parts: tiers (put / get / 1-layer get per tier beside plain copies, files and sockets), codecs (bytes per entry and
throughput per storage codec), cluster (Redis Cluster vs one server, a shard killed mid-run), prefetch (the KV
loading a blended request waits for, with prefetch off and on). Results: benchmarks/results/store_<part>_cpu.json.
"""

from __future__ import annotations

from benchmarks.harness import run_suite

PARTS = {"tiers": "store_bench", "codecs": "codec_bench", "cluster": "cluster_bench", "prefetch": "prefetch_bench"}

if __name__ == "__main__":
    raise SystemExit(run_suite(PARTS))
