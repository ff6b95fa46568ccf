"""Index documents: chunk, embed only chunks the index lacks, and replace the chunks of documents that changed."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvblend.retrieval.chunker import DEFAULT_CHUNKER, Chunk, ChunkerConfig, chunk_document
from kvblend.retrieval.corpus import Document
from kvblend.retrieval.embedder import Embedder
from kvblend.retrieval.vector_index import VectorIndex


def index_documents(
    index: VectorIndex,
    embedder: Embedder,
    tokenizer,
    docs: Iterable[Document],
    config: ChunkerConfig = DEFAULT_CHUNKER,
    on_document: Callable[[Document, list[Chunk], int], None] | None = None,
) -> int:
    """Add the documents' chunks to the index (not saved); returns how many chunks were added.
    `on_document(doc, chunks, added)` follows each document with its chunks as indexed (one per chunk id)."""
    index.check_embedder(embedder)
    stored: dict[str, set[str]] = {}
    for chunk in index.chunks():
        stored.setdefault(chunk.source, set()).add(chunk.chunk_id)
    added = 0
    for doc in docs:
        unique: dict[str, Chunk] = {}
        for chunk in chunk_document(tokenizer, doc, config):
            unique.setdefault(chunk.chunk_id, chunk)
        chunks = list(unique.values())
        if stored.pop(doc.source, set()) - {c.chunk_id for c in chunks}:
            index.remove_source(doc.source)
        new = [c for c in chunks if c.chunk_id not in index]
        n = index.add(new, embedder.embed([c.text for c in new])) if new else 0
        added += n
        if on_document:
            on_document(doc, chunks, n)
    return added
