"""Assemble a RAG prompt from token ids with the model's chat template, never re-tokenising chunk text.

The template is rendered once around a placeholder; the text before it (system turn, user-turn opening, and
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
