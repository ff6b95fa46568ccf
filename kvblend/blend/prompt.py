"""The RAG prompt's one layout and the chunk text recipe every path shares, and prompt assembly from token ids.

A chunk is keyed by the ids of its own text without boundary whitespace (`chunk_token_ids`): in a prompt the
whitespace around a chunk belongs to the separators (`user_message`: each document followed by a blank line, then
the question), where byte-level BPE tokenizers merge it with them, so a chunk's text keeps the ids it has alone.
The chat template is rendered once around a placeholder; the text before it (system turn, user-turn opening, and
any BOS the template writes) becomes the prefix, the question plus the text after it the suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvblend.blend.layout import ChunkRef, LayoutError, PromptLayout
from kvblend.model.tokenizer import encode

PLACEHOLDER = "\x00KVBLEND_DOCUMENTS\x00"
DEFAULT_SYSTEM = "You are a helpful assistant. Answer the question using the documents."
DEFAULT_SEPARATOR = "\n\n"  # after every chunk
DEFAULT_QUESTION_PREFIX = "\n\nQuestion: "  # between the chunks and the question


def chunk_text(text: str) -> str:
    """A document's text as it sits in a prompt and is keyed: without leading or trailing whitespace."""
    return text.strip()


def chunk_token_ids(tokenizer, text: str) -> list[int]:
    """The ids a chunk's KV is keyed by: its `chunk_text`, no special tokens (the chunker, `kvblend precompute`,
    the connector's named documents and `store_documents` all key chunks this way)."""
    stripped = chunk_text(text)
    if not stripped:
        raise ValueError("a chunk's text is empty (whitespace only)")
    return encode(tokenizer, stripped)


def user_message(question: str, documents: Sequence[str]) -> str:
    """The user turn of a RAG prompt: every document's `chunk_text` followed by a blank line, then the question."""
    if not question.strip():
        raise ValueError("the question is empty")
    return "".join(chunk_text(doc) + DEFAULT_SEPARATOR for doc in documents) + DEFAULT_QUESTION_PREFIX + question


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids around the retrieved chunks: prefix, then chunks, then `question_prefix` + question + tail."""

    prefix: tuple[int, ...]
    question_prefix: tuple[int, ...]
    tail: tuple[int, ...]

    def layout(self, tokenizer, chunks: Sequence[ChunkRef], question: str) -> PromptLayout:
        if not question or not question.strip():
            raise LayoutError("empty question")
        suffix = self.question_prefix + tuple(encode(tokenizer, question)) + self.tail
        return PromptLayout.build(self.prefix, chunks, suffix)


def chat_template(tokenizer, system: str = DEFAULT_SYSTEM, question_prefix: str = DEFAULT_QUESTION_PREFIX) -> PromptTemplate:
    """Split the model's chat template (system + one user turn + generation prompt) around the documents."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": PLACEHOLDER}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered.count(PLACEHOLDER) != 1:
        raise ValueError("the chat template does not render the user message verbatim")
    head, tail = rendered.split(PLACEHOLDER)
    return PromptTemplate(
        prefix=tuple(encode(tokenizer, head)),
        question_prefix=tuple(encode(tokenizer, question_prefix)),
        tail=tuple(encode(tokenizer, tail)),
    )
