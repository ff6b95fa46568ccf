"""Retrieval for RAG: text sources (corpus), stable token chunks, sentence-transformers embeddings, a persisted faiss index, LangChain.

Names load on first use (module __getattr__), so importing one submodule (e.g. the chunker's config) does not
import faiss, sentence-transformers or LangChain.
"""

from __future__ import annotations

from kvblend.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
