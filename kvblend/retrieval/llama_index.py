"""LlamaIndex adapters (llama-index-core): a retriever over a kvblend VectorIndex, and a query engine that answers
with the retrieved chunks' KV blended by a RAGPipeline.

Every node is one kvblend chunk: its text is the chunk text, its metadata the same kvblend metadata as the
LangChain adapters' Documents (chunk_id, cache_key, token_ids, source, title, index, score), kept out of the text
LlamaIndex shows an LLM or an embedder. `RAGPipeline.answer(question, nodes)` takes the nodes as they are.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.response.schema import Response
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from pydantic import Field

from kvblend.retrieval.embedder import Embedder
from kvblend.retrieval.langchain import KeyFn, chunk_metadata
from kvblend.retrieval.vector_index import VectorIndex


class KVBlendLlamaIndexRetriever(BaseRetriever):
    """Top-k chunks of a kvblend VectorIndex for a query, as LlamaIndex nodes with kvblend metadata and a score."""

    def __init__(self, index: VectorIndex, embedder: Embedder, key_for: KeyFn, k: int = 4, **kwargs: Any) -> None:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        index.check_embedder(embedder)
        self.index, self.embedder, self.key_for, self.k = index, embedder, key_for, k
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.index.search(self.embedder.embed([query_bundle.query_str])[0], self.k)
        nodes = []
        for chunk, score in hits:
            metadata = chunk_metadata(chunk, self.key_for(chunk.token_ids), score)
            node = TextNode(id_=chunk.chunk_id, text=chunk.text, metadata=metadata,
                            excluded_llm_metadata_keys=list(metadata), excluded_embed_metadata_keys=list(metadata))
            nodes.append(NodeWithScore(node=node, score=score))
        return nodes


class KVBlendQueryEngine(CustomQueryEngine):
    """Retrieve with any LlamaIndex retriever whose nodes carry kvblend metadata, answer with `pipeline.answer`
    (the chunks' cached KV blended in vLLM); the answer's stats are in `response.metadata["stats"]`."""

    retriever: Any
    pipeline: Any
    sampling: dict[str, Any] = Field(default_factory=dict)

    def custom_query(self, query_str: str) -> Response:
        nodes = self.retriever.retrieve(query_str)
        result = self.pipeline.answer(query_str, nodes, **self.sampling)
        return Response(response=result.answer, source_nodes=nodes, metadata={"stats": result.stats})
