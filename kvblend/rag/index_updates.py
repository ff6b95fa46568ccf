"""Keep a persisted VectorIndex of documents up to date, saving as it goes so an interrupted run loses little."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from kvblend.retrieval import Chunk, ChunkerConfig, Embedder, VectorIndex, index_documents
from kvblend.retrieval.corpus import Document

SAVE_EVERY_DOCUMENTS = 16


def index_exists(path: str | os.PathLike) -> bool:
    """True when `path` holds something: an index, or a directory VectorIndex.open will judge (and may refuse)."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def open_index(path: str | os.PathLike) -> VectorIndex:
    """The index saved at `path`; a missing one is a FileNotFoundError that says how to build it."""
    if not index_exists(path):
        raise FileNotFoundError(f"no kvblend index at {path}: add documents first "
                                f"(RAGPipeline.add_documents or `kvblend precompute PATH... --index {path}`)")
    return VectorIndex.open(path)


def update_index(index: VectorIndex, embedder: Embedder, tokenizer, docs: Sequence[Document], chunker: ChunkerConfig,
                 on_document: Callable[[Document, int], None] | None = None) -> tuple[int, list[Chunk]]:
    """Index the documents (unchanged ones cost a chunking pass; changed ones are replaced), saving every few
    documents and at the end. Returns the number of chunks added and every chunk of these documents."""
    index.check_embedder(embedder)
    chunks: list[Chunk] = []
    state = {"size": len(index), "unsaved": 0}

    def indexed(doc: Document, doc_chunks: list[Chunk], n: int) -> None:
        chunks.extend(doc_chunks)
        state["unsaved"] += n > 0 or len(index) != state["size"]
        state["size"] = len(index)
        if state["unsaved"] >= SAVE_EVERY_DOCUMENTS:
            index.save()
            state["unsaved"] = 0
        if on_document:
            on_document(doc, n)

    added = index_documents(index, embedder, tokenizer, docs, chunker, indexed)
    if state["unsaved"]:
        index.save()
    return added, chunks
