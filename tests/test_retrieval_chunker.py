"""Chunker: stable chunks keyed by the ids of their own text, spans that cover the document but its boundary
whitespace, cut at the best boundary in the window tail."""

import itertools

import pytest

from kvblend.blend.prompt import chunk_token_ids
from kvblend.model.tokenizer import encode
from kvblend.retrieval.chunker import Chunk, ChunkerConfig, chunk_document, chunk_id
from kvblend.retrieval.corpus import Document, pydoc_topics

TOPICS = ("exceptions", "try", "integers", "lists", "with")


@pytest.fixture(scope="module")
def docs():
    return pydoc_topics(TOPICS)


def assert_tiles(tokenizer, doc: Document, chunks: list[Chunk]) -> None:
    """The chunks' spans cover the document text in order but for whitespace between them; each chunk's text is
    its span, without boundary whitespace, and its ids are those of its text alone."""
    assert doc.text[: chunks[0].start_char].isspace() or chunks[0].start_char == 0
    assert not doc.text[chunks[-1].end_char :].strip()
    for i, c in enumerate(chunks):
        assert c.index == i and c.source == doc.source and c.title == doc.title
        assert doc.text[c.start_char : c.end_char] == c.text == c.text.strip()
        assert list(c.token_ids) == chunk_token_ids(tokenizer, c.text)
        assert c.chunk_id == chunk_id(doc.source, c.token_ids) and len(c.chunk_id) == 24
    for a, b in itertools.pairwise(chunks):
        assert a.end_char <= b.start_char and not doc.text[a.end_char : b.start_char].strip()


def test_same_text_gives_same_chunks_independent_of_other_documents(tokenizer, docs):
    first = [chunk_document(tokenizer, d, ChunkerConfig(64)) for d in docs]
    again = [chunk_document(tokenizer, d, ChunkerConfig(64)) for d in reversed(docs)][::-1]
    assert first == again
    copy = Document(source="elsewhere.txt", text=docs[0].text, title="copy")
    moved = chunk_document(tokenizer, copy, ChunkerConfig(64))
    assert [c.token_ids for c in moved] == [c.token_ids for c in first[0]]
    assert {c.chunk_id for c in moved}.isdisjoint(c.chunk_id for c in first[0]), "chunk ids include the source"


@pytest.mark.parametrize("size", [16, 64, 512])
def test_chunks_are_contiguous_slices_with_exact_spans(tokenizer, docs, size):
    for doc in docs:
        chunks = chunk_document(tokenizer, doc, ChunkerConfig(size))
        assert_tiles(tokenizer, doc, chunks)
        assert all(1 <= len(c.token_ids) <= size for c in chunks)


def test_window_size_and_cut_region_are_configurable(tokenizer, docs):
    doc = docs[0]
    n = len(encode(tokenizer, doc.text))
    for config in (ChunkerConfig(48), ChunkerConfig(48, min_tokens=24), ChunkerConfig(100, min_tokens=100)):
        chunks = chunk_document(tokenizer, doc, config)
        assert len(chunks) >= -(-n // config.chunk_tokens)
        # a chunk's window holds at least min_tokens; its text drops the window's boundary whitespace tokens
        assert all(config.min_tokens - 3 <= len(c.token_ids) <= config.chunk_tokens for c in chunks[:-1])
    exact = chunk_document(tokenizer, doc, ChunkerConfig(100, min_tokens=100))
    assert max(len(c.token_ids) for c in exact) == 100
    assert ChunkerConfig().chunk_tokens == 512 and ChunkerConfig().min_tokens == 409


def test_cuts_prefer_paragraph_then_sentence_boundaries(tokenizer):
    para = "The first paragraph talks about raising errors. It has two sentences"
    text = para + ".\n\n" + "Another paragraph follows with many more words in it. " * 20
    cut = len(encode(tokenizer, para + ".\n\n"))
    chunks = chunk_document(tokenizer, Document("p.txt", text), ChunkerConfig(cut + 4, min_tokens=cut - 6))
    assert chunks[0].text == para + "."
    assert_tiles(tokenizer, Document("p.txt", text), chunks)
    prose = Document("s.txt", "Short words come here one after another and then end. " * 30)
    for c in chunk_document(tokenizer, prose, ChunkerConfig(40))[:-1]:
        assert c.text.endswith("end."), repr(c.text[-20:])


def test_multibyte_characters_are_not_split(tokenizer):
    doc = Document("emoji.txt", "Grüße 😀🎉 naïve café " * 40)
    chunks = chunk_document(tokenizer, doc, ChunkerConfig(8))
    assert_tiles(tokenizer, doc, chunks)


def test_document_longer_than_the_model_context_becomes_many_chunks(tokenizer, docs):
    doc = Document("long.txt", "\n\n".join(d.text for d in docs) * 3)
    chunks = chunk_document(tokenizer, doc)
    assert sum(len(c.token_ids) for c in chunks) > 8192 and len(chunks) > 16
    assert_tiles(tokenizer, doc, chunks)


def test_empty_document_and_bad_config_are_refused(tokenizer):
    for text in ("", " \n\t\n"):
        with pytest.raises(ValueError, match="empty.txt.*empty"):
            chunk_document(tokenizer, Document("empty.txt", text))
    for kwargs in ({"chunk_tokens": 0}, {"chunk_tokens": 10, "min_tokens": 11}, {"chunk_tokens": 10, "min_tokens": 0}):
        with pytest.raises(ValueError, match="chunk_tokens|min_tokens"):
            ChunkerConfig(**kwargs)
