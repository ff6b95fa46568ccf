"""Retrieval for RAG: text sources (corpus), stable token chunks, sentence-transformers embeddings, a persisted faiss index, LangChain.

Names load on first use (module __getattr__), so importing one submodule (e.g. the chunker's config) does not
import faiss, sentence-transformers or LangChain.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Chunk": "kvblend.retrieval.chunker",
    "ChunkerConfig": "kvblend.retrieval.chunker",
    "chunk_document": "kvblend.retrieval.chunker",
    "Embedder": "kvblend.retrieval.embedder",
    "index_documents": "kvblend.retrieval.ingest",
    "CachedRetriever": "kvblend.retrieval.langchain",
    "KVBlendEmbeddings": "kvblend.retrieval.langchain",
    "KVBlendRetriever": "kvblend.retrieval.langchain",
    "cache_key_fn": "kvblend.retrieval.langchain",
    "chunk_metadata": "kvblend.retrieval.langchain",
    "IndexFormatError": "kvblend.retrieval.vector_index",
    "VectorIndex": "kvblend.retrieval.vector_index",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvblend.retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
