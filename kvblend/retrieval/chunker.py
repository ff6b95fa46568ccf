"""Token-aware chunker whose chunks survive a text round trip: a chunk's stored ids are those of its own text.

Chunks are cut one at a time from a window of the text after the previous chunk (never the whole document at
once, so memory stays bounded on large files): the window is tokenized and the chunk ends at the latest boundary
of the best class in its tail [min_tokens, chunk_tokens]: paragraph break > sentence end > line end > word
boundary > any token boundary. The chunk's text is that span without boundary whitespace (the whitespace between
chunks belongs to the separators a prompt puts around them) and its token ids are `chunk_token_ids(text)`, the
recipe every path keys chunks by. A cut is taken only if the chunk's ids occur as they are in prompts laid out
the documented way (`user_message`: first in the user turn, or between other documents); else the next best cut.
The rule looks only at this document's text, so chunks (and their KV cache keys) never depend on other documents.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvblend.blend.prompt import chunk_token_ids, user_message
from kvblend.model.tokenizer import encode
from kvblend.retrieval.corpus import Document

log = logging.getLogger(__name__)
PARAGRAPH, SENTENCE, LINE, WORD, TOKEN, SPLITS_CHAR = 5, 4, 3, 2, 1, 0
_PARAGRAPH_END = re.compile(r"\n[ \t\r]*\n\s*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
_TAIL_CHARS = 64
_WINDOW_CHARS_PER_TOKEN = 6  # a window's first guess; doubled until it holds more than chunk_tokens tokens
_CONTEXTS = (("\n", []), ("\n", ["Before."]))  # (user-turn opening, documents before the chunk) it must survive
_SURVIVAL_TRIES = 8  # cuts tried for one that survives before the best one is taken anyway


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
    """A span [start_char, end_char) of a document without boundary whitespace, and the ids of that text alone."""

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


def cut_candidates(text: str, offsets: list[tuple[int, int]], config: ChunkerConfig) -> list[int]:
    """Token indices a chunk of the window may end before, best first: the cuts of the tail [min_tokens,
    chunk_tokens] by boundary class, latest first within a class, then the earlier ones, latest first; cuts
    that split a character only where no other cut exists."""
    hard = config.chunk_tokens
    ranked = sorted(((boundary_class(text, offsets, c), c) for c in range(1, hard + 1)),
                    key=lambda x: (x[1] < config.min_tokens, -x[0], -x[1]))
    whole = [c for cls, c in ranked if cls > SPLITS_CHAR]
    return whole or [hard]


def survives_prompts(tokenizer, ids: list[int], text: str) -> bool:
    """True if `ids` occur unchanged where `text` sits in prompts laid out by `user_message`, first in the user
    turn or after another document (the chat template's opening is a line end)."""
    for opening, before in _CONTEXTS:
        prompt = encode(tokenizer, opening + user_message("Why?", [*before, text, "After."]))
        if not any(prompt[i : i + len(ids)] == ids for i in range(len(prompt) - len(ids) + 1)):
            return False
    return True


def _window(tokenizer, text: str, start: int, config: ChunkerConfig) -> tuple[str, list[tuple[int, int]]]:
    """The text from `start` long enough to hold more than chunk_tokens tokens (or the rest of the document),
    and its token offsets."""
    size = config.chunk_tokens * _WINDOW_CHARS_PER_TOKEN
    while True:
        window = text[start : start + size]
        _, offsets = tokenize_with_offsets(tokenizer, window)
        if len(offsets) > config.chunk_tokens + 1 or start + size >= len(text):
            return window, offsets
        size *= 2


def _next_chunk(tokenizer, text: str, start: int, config: ChunkerConfig) -> tuple[int, int, list[int]]:
    """(end_char, next_start, token ids) of the chunk starting at `start` (a non-space character)."""
    window, offsets = _window(tokenizer, text, start, config)
    candidates = [len(offsets)] if len(offsets) <= config.chunk_tokens else cut_candidates(window, offsets, config)
    fallback, tried = None, 0
    for cut in candidates:
        at = start + (offsets[cut][0] if cut < len(offsets) else len(window))
        body = text[start:at].rstrip()
        if not body:
            continue
        ids = chunk_token_ids(tokenizer, body)
        fits = len(ids) <= config.chunk_tokens
        if fallback is None or (fits and not fallback[3]):
            fallback = (start + len(body), at, ids, fits)
        if fits and survives_prompts(tokenizer, ids, body):
            return start + len(body), at, ids
        tried += fits
        if tried >= _SURVIVAL_TRIES:
            break
    log.warning("chunker: no cut near character %d of a document keeps the chunk's token ids in a prompt; its KV "
                "may not be found in prompts built from text", start)
    return fallback[:3]


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def iter_chunks(tokenizer, doc: Document, config: ChunkerConfig = DEFAULT_CHUNKER) -> Iterator[Chunk]:
    """The document's chunks in order, cut one window at a time; an empty (or whitespace-only) document is
    refused."""
    if not doc.text.strip():
        raise ValueError(f"document {doc.source!r} is empty; there is nothing to chunk")
    text, index = doc.text, 0
    start = _skip_space(text, 0)
    while start < len(text):
        end, after, ids = _next_chunk(tokenizer, text, start, config)
        token_ids = tuple(ids)
        yield Chunk(chunk_id=chunk_id(doc.source, token_ids), token_ids=token_ids, text=text[start:end],
                    source=doc.source, title=doc.title, index=index, start_char=start, end_char=end)
        index += 1
        start = _skip_space(text, after)


def chunk_document(tokenizer, doc: Document, config: ChunkerConfig = DEFAULT_CHUNKER) -> list[Chunk]:
    """The document's chunks in order (`iter_chunks`)."""
    return list(iter_chunks(tokenizer, doc, config))
