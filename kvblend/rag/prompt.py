"""RagPrompt: the token ids of a RAG prompt and where each retrieved chunk sits in it (the explicit blend layout)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvblend.blend.prompt import PromptTemplate


@dataclass(frozen=True)
class RagPrompt:
    token_ids: list[int]
    spans: list[tuple[int, int]]  # (start, length) of each chunk, in prompt order


def build_rag_prompt(template: PromptTemplate, chunks: Sequence[Sequence[int]], separator: Sequence[int],
                     question: Sequence[int]) -> RagPrompt:
    """template.prefix + chunk1 + sep + chunk2 + sep ... + question_prefix + question + tail, from token ids only."""
    ids = list(template.prefix)
    spans = []
    for chunk in chunks:
        if not chunk:
            raise ValueError("a chunk of a RAG prompt has no tokens")
        spans.append((len(ids), len(chunk)))
        ids += list(chunk) + list(separator)
    ids += list(template.question_prefix) + list(question) + list(template.tail)
    return RagPrompt(ids, spans)
