"""LangChain adapters: retrievers whose Documents carry kvblend chunk metadata, and an Embeddings over Embedder.

Every returned Document is one kvblend chunk: page_content is the chunk text and metadata holds chunk_id,
cache_key (the ChunkKey digest of its KV computed alone), token_ids, source, title and index, so a chain can
hand the documents to kvblend's generation, which blends the chunks' cached KV instead of prefilling them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document as LCDocument
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import Field, PrivateAttr, model_validator

from kvblend.retrieval.chunker import Chunk, ChunkerConfig, chunk_document
from kvblend.retrieval.corpus import Document
from kvblend.retrieval.embedder import Embedder
from kvblend.retrieval.vector_index import VectorIndex
from kvblend.store.key import DEFAULT_NAMESPACE, ChunkKey

KeyFn = Callable[[Sequence[int]], str]


def cache_key_fn(fingerprint: str, namespace: str = DEFAULT_NAMESPACE) -> KeyFn:
    """token ids -> ChunkKey digest of their KV computed alone, for the model with this fingerprint."""
    ChunkKey.alone(fingerprint, (0,), namespace)  # validate fingerprint and namespace now, not per query

    def key_for(token_ids: Sequence[int]) -> str:
        return ChunkKey.alone(fingerprint, token_ids, namespace).digest

    return key_for


def chunk_metadata(chunk: Chunk, cache_key: str, score: float | None = None) -> dict[str, Any]:
    """The kvblend metadata a chunk's Document carries."""
    metadata = {
        "chunk_id": chunk.chunk_id,
        "cache_key": cache_key,
        "token_ids": list(chunk.token_ids),
        "source": chunk.source,
        "title": chunk.title,
        "index": chunk.index,
    }
    if score is not None:
        metadata["score"] = score
    return metadata


class KVBlendEmbeddings(Embeddings):
    """LangChain Embeddings over a kvblend Embedder (default: the bundled all-MiniLM-L6-v2)."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self.embedder = embedder or Embedder()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed([text])[0].tolist()


class KVBlendRetriever(BaseRetriever):
    """Top-k chunks of a kvblend VectorIndex for a query, as Documents with kvblend metadata and a score."""

    index: VectorIndex
    embedder: Embedder
    key_for: KeyFn
    k: int = Field(default=4, gt=0)

    @model_validator(mode="after")
    def _same_embedder(self) -> KVBlendRetriever:
        self.index.check_embedder(self.embedder)
        return self

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[LCDocument]:
        """Top `k` chunks (default: the `k` field), best first."""
        hits = self.index.search(self.embedder.embed([query])[0], self.k if k is None else k)
        return [
            LCDocument(id=c.chunk_id, page_content=c.text, metadata=chunk_metadata(c, self.key_for(c.token_ids), s))
            for c, s in hits
        ]


def hit_source(doc: LCDocument) -> str:
    """A stable source name for a wrapped retriever's hit: its metadata 'source', its id, else a content hash."""
    source = doc.metadata.get("source") or doc.id
    if source:
        return str(source)
    return "langchain:" + hashlib.sha256(doc.page_content.encode("utf-8")).hexdigest()[:16]


class CachedRetriever(BaseRetriever):
    """Wraps any LangChain retriever: each hit is cut into kvblend chunks (stable ids and cache keys).

    `on_new_chunks(chunks)` is called with the chunks whose cache key this retriever has not returned before
    (e.g. to precompute their KV); if it raises, those chunks count as unseen again. Empty hits are dropped.
    """

    retriever: BaseRetriever
    tokenizer: Any
    key_for: KeyFn
    chunker: ChunkerConfig = Field(default_factory=ChunkerConfig)
    on_new_chunks: Callable[[list[Chunk]], None] | None = None
    _seen: set[str] = PrivateAttr(default_factory=set)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def from_vectorstore(
        cls, store: VectorStore, tokenizer, key_for: KeyFn, k: int = 4, **kwargs: Any
    ) -> CachedRetriever:
        """A CachedRetriever over `store.as_retriever()` returning the store's top k hits."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        return cls(retriever=store.as_retriever(search_kwargs={"k": k}), tokenizer=tokenizer, key_for=key_for, **kwargs)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[LCDocument]:
        """The wrapped retriever's hits (extra invoke kwargs go to it), each cut into kvblend chunks."""
        hits = self.retriever.invoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        out: list[LCDocument] = []
        keyed: list[tuple[Chunk, str]] = []
        for hit in hits:
            if not hit.page_content.strip():
                continue
            doc = Document(source=hit_source(hit), text=hit.page_content, title=str(hit.metadata.get("title", "")))
            for chunk in chunk_document(self.tokenizer, doc, self.chunker):
                key = self.key_for(chunk.token_ids)
                keyed.append((chunk, key))
                metadata = {**hit.metadata, **chunk_metadata(chunk, key)}
                out.append(LCDocument(id=chunk.chunk_id, page_content=chunk.text, metadata=metadata))
        self._report_new(keyed)
        return out

    def _report_new(self, keyed: list[tuple[Chunk, str]]) -> None:
        with self._lock:
            new = {}
            for chunk, key in keyed:
                if key not in self._seen and key not in new:
                    new[key] = chunk
            self._seen.update(new)
        if new and self.on_new_chunks is not None:
            try:
                self.on_new_chunks(list(new.values()))
            except BaseException:
                with self._lock:
                    self._seen.difference_update(new)
                raise
