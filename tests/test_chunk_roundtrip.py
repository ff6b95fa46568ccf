"""Chunks survive a text round trip (tokenizer only): every chunk's stored ids are found in chat prompts rendered
from the chunks' texts the way clients render them (kvblend.client.rag_messages and the model's chat template,
the LangChain layout), with chunk boundaries cut at random places of real text."""

import random

import pytest
from text_corpus import CHUNK_TOKENS, DOCUMENTS

from kvblend.blend.prompt import chunk_token_ids
from kvblend.client import rag_messages
from kvblend.retrieval.chunker import ChunkerConfig, chunk_document, iter_chunks
from kvblend.retrieval.corpus import Document, pydoc_topics
from kvblend.vllm.params import locate_documents

PROMPTS = 60


def chat_ids(tokenizer, question: str, texts: list[str]) -> list[int]:
    """The token ids vLLM's chat endpoint prefills for these messages (the template renders BOS etc. itself)."""
    rendered = tokenizer.apply_chat_template(rag_messages(question, texts), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def random_chunks(tokenizer, rng: random.Random) -> list:
    """Chunks of random slices of pydoc topics and of the corpus, under random window sizes."""
    topics = pydoc_topics(["try", "with", "lambda", "for", "string-methods", "formatstrings", "assert", "import"])
    chunks = []
    for doc in topics + DOCUMENTS:
        start = rng.randrange(0, max(1, len(doc.text) // 3))
        size = rng.choice([12, 24, 48, 96, 200])
        config = ChunkerConfig(size, min_tokens=rng.randint(1, size))
        piece = doc.text[start:]
        if piece.strip():
            chunks += chunk_document(tokenizer, Document(doc.source, piece, doc.title), config)
    return chunks


def test_every_chunk_is_found_in_chat_prompts_built_from_texts(tokenizer):
    rng = random.Random(26)
    chunks = random_chunks(tokenizer, rng)
    fragile = sum(c.text != c.text.strip() or "\n\n" in c.text for c in chunks)
    assert len(chunks) > 200 and fragile > 20
    found = total = 0
    for _ in range(PROMPTS):
        picked = rng.sample(chunks, rng.randint(1, 5))
        texts = [c.text + rng.choice(["", "\n", "\n\n", " \n\n", "\n\n\n"]) for c in picked]  # as clients keep them
        prompt = chat_ids(tokenizer, "What does this say?", texts)
        located = locate_documents(prompt, [list(c.token_ids) for c in picked])
        assert [chunk_token_ids(tokenizer, t) for t in texts] == [list(c.token_ids) for c in picked]
        total += len(picked)
        found += sum(span is not None for span in located)
        assert all(span is not None for span in located), [c.text[-30:] for c, s in zip(picked, located) if s is None]
    assert found == total


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: d.source)
def test_corpus_chunks_end_at_paragraph_breaks_and_keep_their_texts_ids(tokenizer, doc):
    chunks = chunk_document(tokenizer, doc, ChunkerConfig(CHUNK_TOKENS))
    assert len(chunks) >= 2
    for chunk in chunks:
        assert chunk.text == chunk.text.strip() and list(chunk.token_ids) == chunk_token_ids(tokenizer, chunk.text)
        assert doc.text[chunk.start_char : chunk.end_char] == chunk.text
    assert any(doc.text[c.end_char : c.end_char + 2] == "\n\n" for c in chunks[:-1]), "cut at a paragraph"


class CountingTokenizer:
    """The real tokenizer, counting the characters it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text: str, **kwargs):
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


def test_precompute_chunks_a_large_file_lazily(tokenizer):
    """`kvblend precompute --max-chunks 2` on a large text tokenizes a few windows, not the file (which peaked
    at 7.8 GB on a 50 MB text when it was tokenized whole)."""
    from kvblend.rag.precompute import PrecomputeConfig, text_chunks

    big = Document("big.txt", "\n\n".join(d.text for d in pydoc_topics()[:60]) * 5)
    assert len(big.text) > 1_000_000
    counting = CountingTokenizer(tokenizer)
    chunks = list(text_chunks(counting, [big], PrecomputeConfig(chunk_tokens=256, max_chunks=2)))
    assert [index for _, index, _ in chunks] == [0, 1]
    assert chunks[0][2] == next(iter_chunks(tokenizer, big, ChunkerConfig(256))).token_ids
    assert counting.chars < 40_000
