"""LlamaIndex retriever adapter: nodes are kvblend chunks whose metadata (cache keys, token ids) stays out of the
text LlamaIndex shows an LLM or an embedder."""

import asyncio

import pytest
from llama_index.core.schema import MetadataMode

from kvblend.model.spec import load_spec
from kvblend.retrieval.chunker import ChunkerConfig
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.retrieval.embedder import Embedder
from kvblend.retrieval.ingest import index_documents
from kvblend.retrieval.langchain import cache_key_fn
from kvblend.retrieval.llama_index import KVBlendLlamaIndexRetriever
from kvblend.retrieval.vector_index import VectorIndex
from kvblend.store.key import ChunkKey

pytestmark = pytest.mark.slow  # loads the MiniLM embedder

TOPICS = ("exceptions", "try", "integers", "lists")


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def index(tmp_path_factory, tokenizer, embedder):
    index = VectorIndex.create(tmp_path_factory.mktemp("li") / "idx", embedder.dim, embedder.name)
    index_documents(index, embedder, tokenizer, pydoc_topics(TOPICS), ChunkerConfig(128))
    return index


def test_retriever_returns_chunks_as_nodes_with_cache_keys(index, embedder, model_dir):
    fingerprint = load_spec(model_dir).fingerprint
    retriever = KVBlendLlamaIndexRetriever(index, embedder, cache_key_fn(fingerprint, "li-test"), k=3)
    question = "How do I catch an exception and handle the error?"
    nodes = retriever.retrieve(question)
    assert len(nodes) == 3 and nodes[0].metadata["source"] in ("pydoc:exceptions", "pydoc:try")
    assert [n.score for n in nodes] == sorted((n.score for n in nodes), reverse=True)
    stored = {c.chunk_id: c for c in index.chunks()}
    for node in nodes:
        chunk = stored[node.node.node_id]
        assert node.metadata["token_ids"] == list(chunk.token_ids)
        assert node.metadata["cache_key"] == ChunkKey.alone(fingerprint, chunk.token_ids, "li-test").digest
        assert node.node.get_content(MetadataMode.LLM) == chunk.text == node.node.get_content(MetadataMode.EMBED)
    again = asyncio.run(retriever.aretrieve(question))
    assert [n.node.node_id for n in again] == [n.node.node_id for n in nodes]


def test_retriever_refuses_bad_k_and_another_embedder(tmp_path, index, embedder):
    with pytest.raises(ValueError, match="k must be positive"):
        KVBlendLlamaIndexRetriever(index, embedder, cache_key_fn("f" * 64), k=0)
    other = VectorIndex.create(tmp_path / "other", embedder.dim, "another-embedder-000000000000")
    with pytest.raises(ValueError, match="another-embedder"):
        KVBlendLlamaIndexRetriever(other, embedder, cache_key_fn("f" * 64))
