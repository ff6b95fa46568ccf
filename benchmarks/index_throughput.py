"""Indexing throughput: RAGPipeline.precompute (chunk KV computed through vLLM and stored) vs the same engine's
own prefill of the same chunks, in chunks/s.

Documents: the first --topics topics of the Python language reference, chunked by RAGPipeline (512 tokens),
embedded and indexed first (not timed). One engine (embedded SmolLM2 in this CPU's compute dtype, kvblend.cpu;
kvblend connector, load format kvblend). Timed, one after the other on that engine:
  prefill     every chunk as its own prompt, max_tokens=1, kvblend off, one generate call (vLLM's own prefill
              throughput; a cache salt keeps these prompts out of the precompute run's prefix-cache lookups)
  precompute  RAGPipeline.precompute(chunks): the same prompts with store_prompt, the connector extracting and
              storing each chunk's KV (memory + disk tiers)
    python -m benchmarks.vllm_cpu index [--tiny] [--topics N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topics", type=int, default=25)
    parser.add_argument("--json", default=str(result_path("vllm_cpu_index")))
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import SamplingParams

    from kvblend.rag.engine import configure_vllm_logging
    from kvblend.rag.pipeline import RAGPipeline
    from kvblend.retrieval.corpus import pydoc_topics

    configure_vllm_logging("WARNING")
    docs = pydoc_topics()[: args.topics]
    with tempfile.TemporaryDirectory(prefix="kvblend-index-bench-") as work, \
            RAGPipeline.from_defaults(index_dir=Path(work) / "index", store_dir=Path(work) / "store") as rag:
        summary = rag.add_documents(docs, precompute=False)
        chunks = list(rag.index.chunks())
        tokens = sum(len(c.token_ids) for c in chunks)
        engine = rag.llm  # started and warmed up before timing
        plain = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": {"kvblend": {"mode": "off"}}})
        start = time.perf_counter()
        engine.generate([{"prompt_token_ids": list(c.token_ids), "cache_salt": "bench-prefill"} for c in chunks],
                         plain, use_tqdm=False)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        stored = rag.precompute(chunks, progress=True)
        precompute_s = time.perf_counter() - start
        engine_args = rag.config.engine_kwargs
    runs = {"prefill": prefill_s, "precompute": precompute_s}
    report = record("vllm_cpu_index", [{"run": run, "seconds": s, "chunks_per_s": len(chunks) / s,
                                        "tokens_per_s": tokens / s} for run, s in runs.items()],
                    documents=summary.documents, chunks=len(chunks), tokens=tokens, stored=stored,
                    engine_args=engine_args, precompute_vs_prefill=prefill_s / precompute_s,
                    load_average=os.getloadavg())
    write(args.json, report)
    print(f"{summary.documents} documents, {len(chunks)} chunks, {tokens} tokens; {stored} stored")
    print("| run | s | chunks/s | tokens/s |\n|---|---:|---:|---:|")
    for row in report["rows"]:
        print(f"| {row['run']} | {row['seconds']:.1f} | {row['chunks_per_s']:.2f} | {row['tokens_per_s']:.0f} |")
    print(f"precompute at {report['precompute_vs_prefill']:.0%} of the engine's prefill throughput")
    return 0


TINY = ["--topics", "2", "--json", tiny_out("vllm_cpu_index.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
