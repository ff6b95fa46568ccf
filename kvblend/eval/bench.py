"""TTFT of plain vLLM vs kvblend blending on the same retrieved prompts, through one RAGPipeline (`kvblend bench`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kvblend.rag.pipeline import RAGPipeline
from kvblend.retrieval import VectorIndex

# A request that ends at its first token finishes before the connector's blend report reaches it.
BENCH_MAX_TOKENS = 2


@dataclass(frozen=True)
class BenchRow:
    question: str
    prompt_tokens: int
    plain_ttft_ms: float
    blend_ttft_ms: float
    chunks: int
    tokens_reused: int
    tokens_recomputed: int
    error: str | None

    @property
    def speedup(self) -> float:
        """Plain TTFT / blend TTFT: above 1, blending was faster."""
        return self.plain_ttft_ms / self.blend_ttft_ms


def default_questions(index: VectorIndex, n: int) -> list[str]:
    """One question per document title (or source), for the first n documents of the index."""
    titles = []
    for source in index.sources():
        title = index.chunks(source)[0].title or source
        if title not in titles:
            titles.append(title)
    return [f"What does the documentation say about {title}?" for title in titles[:n]]


def run_bench(rag: RAGPipeline, questions: Sequence[str], top_k: int | None = None,
              max_tokens: int = BENCH_MAX_TOKENS) -> list[BenchRow]:
    """Each question blended, then as plain vLLM (own prefix cache, no kvblend), one request at a time."""
    rows = []
    for question in questions:
        blend = rag.query(question, top_k=top_k, max_tokens=max_tokens)
        plain = rag.query(question, top_k=top_k, blend=False, max_tokens=max_tokens)
        if blend.stats.ttft_ms is None or plain.stats.ttft_ms is None:
            raise RuntimeError("vLLM reported no TTFT metrics (engine_args disable_log_stats must stay False)")
        rows.append(BenchRow(question, plain.stats.prompt_tokens, plain.stats.ttft_ms, blend.stats.ttft_ms,
                             blend.stats.chunks, blend.stats.tokens_reused, blend.stats.tokens_recomputed,
                             blend.stats.error))
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    header = (f"{'prompt':>6s} {'plain ms':>9s} {'blend ms':>9s} {'speedup':>7s} {'chunks':>6s} {'reused':>6s} "
              f"{'recomp':>6s}  question")
    lines = [header]
    for r in rows:
        lines.append(f"{r.prompt_tokens:6d} {r.plain_ttft_ms:9.1f} {r.blend_ttft_ms:9.1f} {r.speedup:6.2f}x "
                     f"{r.chunks:6d} {r.tokens_reused:6d} {r.tokens_recomputed:6d}  {r.question}"
                     + (f"  [blend failed, vLLM recomputed: {r.error}]" if r.error else ""))
    plain = statistics.median(r.plain_ttft_ms for r in rows)
    blend = statistics.median(r.blend_ttft_ms for r in rows)
    lines.append(f"median TTFT: plain vLLM {plain:.1f} ms, kvblend blend {blend:.1f} ms, "
                 f"plain / blend = {plain / blend:.2f}x over {len(rows)} questions")
    return "\n".join(lines)
