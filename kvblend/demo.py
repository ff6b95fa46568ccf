"""`make demo`: RAG over the Python language reference, answered by vLLM with and without kvblend's KV blending.

Indexes a fixed subset of the `pydoc_data.topics` shipped with Python (to stay quick on a few CPU cores),
precomputes every chunk's KV through vLLM, then answers three questions twice, as plain vLLM and with the
retrieved chunks' cached KV blended, and prints answers, sources, TTFT and tokens reused / recomputed.
Run it again: the index and the chunk KV are reused, nothing is recomputed.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

from kvblend.paths import cache_dir

DEMO_TOPICS = ("assert", "break", "class", "exceptions", "for", "function", "global", "if", "import", "lambda",
               "raise", "return", "try", "while", "with")
QUESTIONS = ("What happens when an exception is raised inside a try block that has a finally clause?",
             "How does the import statement find and load a module?",
             "What is the difference between a lambda expression and a function defined with def?")


def show(label: str, result) -> None:
    s = result.stats
    cached = f"{s.num_cached_tokens} tokens from vLLM's prefix cache"
    if s.mode == "blend":
        hits = ", ".join(f"{tier} {n}" for tier, n in s.hits.items() if n)
        cached = (f"{s.chunks} chunks blended: {s.tokens_reused} tokens reused, {s.tokens_recomputed} recomputed, "
                  f"blend engine {s.blend_ms:.0f} ms (store reads: {hits or 'none'})")
        if s.error:
            cached = f"blend failed, vLLM recomputed the prompt: {s.error}"
    print(f"  {label:12s} TTFT {s.ttft_ms:7.1f} ms   prompt {s.prompt_tokens} tokens, {cached}")
    print(textwrap.indent(textwrap.fill(result.answer.strip() or "(empty answer)", 100), "      "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(cache_dir() / "demo"), help="index and store live here")
    parser.add_argument("--redis", default=os.environ.get("KVBLEND_REDIS_URL"), help="also use this Redis tier")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                        help="the engine's dtype (default: this CPU's compute dtype, bfloat16 only with native bf16)")
    args = parser.parse_args(argv)

    from kvblend.rag.engine import configure_vllm_logging

    configure_vllm_logging("ERROR")

    from kvblend.cpu import cpu_model, native_bf16
    from kvblend.rag.pipeline import RAGPipeline
    from kvblend.retrieval.corpus import pydoc_topics
    from kvblend.store import redact_url

    print(f"kvblend demo: {len(DEMO_TOPICS)} of the Python language reference topics (pydoc_data.topics), a fixed "
          f"subset so it stays quick on CPU:\n  {', '.join(DEMO_TOPICS)}")
    redis = f", Redis {redact_url(args.redis)}" if args.redis else ""
    print(f"index and chunk KV store under {args.dir}{redis}", flush=True)
    start = time.perf_counter()
    with RAGPipeline.from_defaults(index_dir=os.path.join(args.dir, "index"), store_dir=os.path.join(args.dir, "store"),
                                   redis_url=args.redis, max_tokens=args.max_tokens,
                                   engine_args={"dtype": args.dtype} if args.dtype else {}) as rag:
        bf16 = "native bf16" if native_bf16() else "no native bf16"
        print(f"model {rag.model_dir.name} in {rag.config.dtype} (this CPU: {cpu_model()}, {bf16}); indexing, then "
              "precomputing chunk KV through vLLM (the engine starts on first use: about half a minute)...", flush=True)
        summary = rag.add_documents(pydoc_topics(DEMO_TOPICS), progress=True)
        print(f"{summary.documents} documents -> {summary.chunks} chunks ({summary.chunks_added} new to the index), "
              f"{summary.chunks_precomputed} chunk KV computed now, the rest already stored "
              f"[{time.perf_counter() - start:.0f} s]\n", flush=True)
        rows = []
        for number, question in enumerate(QUESTIONS, 1):
            plain = rag.query(question, blend=False)
            blended = rag.query(question)
            print(f"Q{number} {question}")
            print("  sources: " + ", ".join(f"{s.title} #{s.index} ({s.score:.2f})" for s in blended.sources))
            show("plain vLLM", plain)
            show("kvblend", blended)
            print(flush=True)
            rows.append((plain.stats.ttft_ms, blended.stats.ttft_ms))
    print(f"{'':3s} {'plain vLLM':>12s} {'kvblend':>12s} {'plain/kvblend':>14s}")
    for number, (plain_ms, blend_ms) in enumerate(rows, 1):
        print(f"Q{number:<2d} {plain_ms:9.1f} ms {blend_ms:9.1f} ms {plain_ms / blend_ms:13.2f}x")
    print("TTFT = vLLM's first_token_ts - scheduled_ts (prefill, including kvblend's blending in the worker). "
          f"Done in {time.perf_counter() - start:.0f} s; run again to reuse the index and the stored KV.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
