"""Token-aware chunker with stable boundaries: the same document text always yields the same chunk token ids.

The document is tokenized once (no special tokens) and cut into contiguous windows of at most `chunk_tokens`
tokens, so concatenating a document's chunks gives exactly its token ids. Each window is cut at the latest
boundary of the best class found in its tail [min_tokens, chunk_tokens]: paragraph break > sentence end >
line end > word boundary > any token boundary that does not split a character. The rule looks only at this
document's text, so chunks (and their KV cache keys) never depend on other documents.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from kvblend.retrieval.corpus import Document

PARAGRAPH, SENTENCE, LINE, WORD, TOKEN, SPLITS_CHAR = 5, 4, 3, 2, 1, 0
_PARAGRAPH_END = re.compile(r"\n[ \t\r]*\n\s*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
_TAIL_CHARS = 64


@dataclass(frozen=True)
class ChunkerConfig:
    """Window size in tokens; a preferred cut is searched for from `min_tokens` (default 80% of the window) on."""

    chunk_tokens: int = 512
    min_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.min_tokens is None:
            object.__setattr__(self, "min_tokens", max(1, self.chunk_tokens * 4 // 5))
        if not 1 <= self.min_tokens <= self.chunk_tokens:
            raise ValueError(f"min_tokens must be in [1, chunk_tokens={self.chunk_tokens}], got {self.min_tokens}")


DEFAULT_CHUNKER = ChunkerConfig()


@dataclass(frozen=True)
class Chunk:
    """A contiguous slice of a document's token ids and the exact text span [start_char, end_char) they cover."""

    chunk_id: str
    token_ids: tuple[int, ...]
    text: str
    source: str
    title: str
    index: int
    start_char: int
    end_char: int


def chunk_id(source: str, token_ids: tuple[int, ...]) -> str:
    """Stable content id: sha256 over the source name and the token ids (little-endian int64), 24 hex chars."""
    digest = hashlib.sha256(source.encode("utf-8") + b"\0")
    digest.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return digest.hexdigest()[:24]


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (no special tokens) and each token's (start, end) character span in `text`."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ValueError("the chunker needs a fast (Rust) tokenizer that reports character offsets") from exc
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def boundary_class(text: str, offsets: list[tuple[int, int]], cut: int) -> int:
    """How good a cut before token `cut` is: PARAGRAPH > SENTENCE > LINE > WORD > TOKEN > SPLITS_CHAR."""
    if offsets[cut - 1][1] > offsets[cut][0]:
        return SPLITS_CHAR
    at = offsets[cut][0]
    tail = text[max(0, at - _TAIL_CHARS) : at]
    spaced = tail[-1:].isspace() or text[at : at + 1].isspace()
    if _PARAGRAPH_END.search(tail):
        return PARAGRAPH
    if spaced and _SENTENCE_END.search(tail):
        return SENTENCE
    if tail.endswith("\n"):
        return LINE
    return WORD if spaced else TOKEN


def cut_points(text: str, offsets: list[tuple[int, int]], config: ChunkerConfig) -> list[int]:
    """Token indices where chunks end (the last is len(offsets)), chosen greedily from the document start.

    When the tail has no cut that keeps characters whole, the latest such cut anywhere in the window is taken,
    else the hard cut (only a window smaller than one character's tokens: then two chunks' spans overlap).
    """
    n = len(offsets)
    cuts, start = [], 0
    while n - start > config.chunk_tokens:
        hard = start + config.chunk_tokens
        best, best_class = hard, boundary_class(text, offsets, hard)
        for cut in range(hard - 1, start + config.min_tokens - 1, -1):
            cls = boundary_class(text, offsets, cut)
            if cls > best_class:
                best, best_class = cut, cls
        if best_class == SPLITS_CHAR:
            best = next((c for c in range(hard - 1, start, -1) if boundary_class(text, offsets, c) > SPLITS_CHAR), hard)
        cuts.append(best)
        start = best
    cuts.append(n)
    return cuts


def chunk_document(tokenizer, doc: Document, config: ChunkerConfig = DEFAULT_CHUNKER) -> list[Chunk]:
    """The document's chunks in order; an empty (or whitespace-only) document is refused."""
    if not doc.text.strip():
        raise ValueError(f"document {doc.source!r} is empty; there is nothing to chunk")
    ids, offsets = tokenize_with_offsets(tokenizer, doc.text)
    chunks, start = [], 0
    for index, end in enumerate(cut_points(doc.text, offsets, config)):
        token_ids = tuple(ids[start:end])
        start_char, end_char = offsets[start][0], offsets[end - 1][1]
        chunks.append(
            Chunk(
                chunk_id=chunk_id(doc.source, token_ids),
                token_ids=token_ids,
                text=doc.text[start_char:end_char],
                source=doc.source,
                title=doc.title,
                index=index,
                start_char=start_char,
                end_char=end_char,
            )
        )
        start = end
    return chunks
