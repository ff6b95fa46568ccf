"""Retrieval for RAG: text sources (corpus), stable token chunks, sentence-transformers embeddings, a persisted faiss index, LangChain."""

from kvblend.retrieval.chunker import Chunk, ChunkerConfig, chunk_document
from kvblend.retrieval.embedder import Embedder
from kvblend.retrieval.ingest import index_documents
from kvblend.retrieval.langchain import (
    CachedRetriever,
    KVBlendEmbeddings,
    KVBlendRetriever,
    cache_key_fn,
    chunk_metadata,
)
from kvblend.retrieval.vector_index import IndexFormatError, VectorIndex

__all__ = [
    "CachedRetriever",
    "Chunk",
    "ChunkerConfig",
    "Embedder",
    "IndexFormatError",
    "KVBlendEmbeddings",
    "KVBlendRetriever",
    "VectorIndex",
    "cache_key_fn",
    "chunk_document",
    "chunk_metadata",
    "index_documents",
]
