"""LangChain adapters: Documents carry kvblend chunk metadata whose cache keys match the chunks' token ids."""

import pytest
from langchain_core.documents import Document as LCDocument
from langchain_core.runnables import RunnableLambda
from langchain_core.vectorstores import InMemoryVectorStore

from kvblend.blend.prompt import chunk_token_ids
from kvblend.model.spec import load_spec
from kvblend.retrieval.chunker import ChunkerConfig, chunk_document
from kvblend.retrieval.corpus import Document, pydoc_topics
from kvblend.retrieval.embedder import Embedder
from kvblend.retrieval.ingest import index_documents
from kvblend.retrieval.langchain import CachedRetriever, KVBlendEmbeddings, KVBlendRetriever, cache_key_fn
from kvblend.retrieval.vector_index import VectorIndex
from kvblend.store.key import ChunkKey

TOPICS = ("exceptions", "try", "integers", "lists", "with")
NAMESPACE = "docs-test"
KVBLEND_KEYS = {"chunk_id", "cache_key", "token_ids", "source", "title", "index"}


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def fingerprint(model_dir):
    return load_spec(model_dir).fingerprint


@pytest.fixture(scope="module")
def index(tmp_path_factory, tokenizer, embedder):
    index = VectorIndex.create(tmp_path_factory.mktemp("lc") / "idx", embedder.dim, embedder.name)
    index_documents(index, embedder, tokenizer, pydoc_topics(TOPICS), ChunkerConfig(128))
    return index


@pytest.fixture(scope="module")
def store(embedder):
    """A real langchain_core InMemoryVectorStore over kvblend's embedder, holding whole topic texts."""
    store = InMemoryVectorStore(KVBlendEmbeddings(embedder))
    docs = pydoc_topics(TOPICS)
    store.add_documents(
        [LCDocument(page_content=d.text, metadata={"source": d.source, "topic": d.title}) for d in docs]
    )
    return store


def assert_kvblend_metadata(doc: LCDocument, tokenizer, fingerprint: str) -> None:
    ids = doc.metadata["token_ids"]
    assert isinstance(ids, list) and ids
    expected = ChunkKey.for_tokens(fingerprint, ids, NAMESPACE, "alone").digest
    assert doc.metadata["cache_key"] == expected
    assert doc.id == doc.metadata["chunk_id"]


@pytest.mark.slow
def test_kvblend_retriever_returns_chunks_with_cache_keys(index, embedder, tokenizer, fingerprint):
    retriever = KVBlendRetriever(index=index, embedder=embedder, key_for=cache_key_fn(fingerprint, NAMESPACE), k=3)
    docs = retriever.invoke("How do I catch an exception and handle the error?")
    assert len(docs) == 3 and docs[0].metadata["source"] in ("pydoc:exceptions", "pydoc:try")
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)
    stored = {c.chunk_id: c for c in index.chunks()}
    for doc in docs:
        assert set(doc.metadata) == KVBLEND_KEYS | {"score"}
        assert_kvblend_metadata(doc, tokenizer, fingerprint)
        chunk = stored[doc.metadata["chunk_id"]]
        assert doc.page_content == chunk.text and tuple(doc.metadata["token_ids"]) == chunk.token_ids
        assert (doc.metadata["title"], doc.metadata["index"]) == (chunk.title, chunk.index)
    assert len(retriever.invoke("lists", k=50)) == len(index), "k per call; more than the index holds returns all"
    chain = retriever | RunnableLambda(lambda found: [d.metadata["cache_key"] for d in found])
    assert chain.invoke("How do I catch an exception and handle the error?") == [d.metadata["cache_key"] for d in docs]


@pytest.mark.slow
def test_kvblend_retriever_refuses_mismatched_embedder_and_bad_k(tmp_path, index, embedder, fingerprint):
    other = VectorIndex.create(tmp_path / "other", embedder.dim, "another-embedder-000000000000")
    with pytest.raises(ValueError, match="another-embedder"):
        KVBlendRetriever(index=other, embedder=embedder, key_for=cache_key_fn(fingerprint))
    with pytest.raises(ValueError, match="greater than 0"):
        KVBlendRetriever(index=index, embedder=embedder, key_for=cache_key_fn(fingerprint), k=0)
    with pytest.raises(ValueError, match="namespace"):
        cache_key_fn(fingerprint, "not a namespace!")


@pytest.mark.slow
def test_cached_retriever_chunks_hits_and_reports_each_new_chunk_once(store, tokenizer, fingerprint):
    reported: list[list] = []
    config = ChunkerConfig(64)
    retriever = CachedRetriever.from_vectorstore(
        store, tokenizer, cache_key_fn(fingerprint, NAMESPACE), k=2, chunker=config, on_new_chunks=reported.append
    )
    docs = retriever.invoke("How do I catch an exception and handle the error?")
    assert len(reported) == 1 and len(docs) == len(reported[0]) > 2, "each hit is several 64-token chunks"
    by_source: dict[str, list[LCDocument]] = {}
    for doc in docs:
        assert KVBLEND_KEYS | {"topic"} <= set(doc.metadata), "kvblend metadata plus the hit's own"
        assert_kvblend_metadata(doc, tokenizer, fingerprint)
        by_source.setdefault(doc.metadata["source"], []).append(doc)
    assert len(by_source) == 2
    for source, parts in by_source.items():
        topic = source.removeprefix("pydoc:")
        text = pydoc_topics([topic])[0].text
        # each part keyed by its own text's ids (chunk_token_ids); together they cover the text but its whitespace
        assert all(list(d.metadata["token_ids"]) == chunk_token_ids(tokenizer, d.page_content) for d in parts)
        assert "".join("".join(d.page_content.split()) for d in parts) == "".join(text.split())
        stable = chunk_document(tokenizer, Document(source, text, topic), config)
        assert [d.metadata["chunk_id"] for d in parts] == [c.chunk_id for c in stable]
    assert [c.chunk_id for c in reported[0]] == [d.metadata["chunk_id"] for d in docs]

    assert retriever.invoke("How do I catch an exception and handle the error?") == docs
    assert len(reported) == 1, "nothing new: no call"
    retriever.invoke("exception handlers and the finally clause")
    retriever.invoke("mutable sequences: append items to a list")
    keys = [key for call in reported for key in (retriever.key_for(c.token_ids) for c in call)]
    assert len(keys) == len(set(keys)), "a chunk is reported at most once"
    assert len(reported) >= 2


@pytest.mark.slow
def test_cached_retriever_reports_chunks_again_when_the_callback_failed(store, tokenizer, fingerprint):
    calls: list[int] = []

    def flaky(chunks):
        calls.append(len(chunks))
        if len(calls) == 1:
            raise RuntimeError("precompute failed")

    retriever = CachedRetriever.from_vectorstore(store, tokenizer, cache_key_fn(fingerprint), k=1, on_new_chunks=flaky)
    with pytest.raises(RuntimeError, match="precompute failed"):
        retriever.invoke("integer literals")
    docs = retriever.invoke("integer literals")
    retriever.invoke("integer literals")
    assert calls == [len(docs), len(docs)]
    assert docs[0].metadata["source"] == "pydoc:integers" and docs[0].metadata["topic"] == "integers"
    wider = retriever.invoke("integer literals", k=2)
    assert {d.metadata["source"] for d in wider} > {"pydoc:integers"}, "invoke kwargs reach the wrapped retriever"


@pytest.mark.slow
def test_kvblend_embeddings_adapter(embedder):
    adapter = KVBlendEmbeddings(embedder)
    vectors = adapter.embed_documents(["one", "two"])
    query = adapter.embed_query("one")
    assert len(vectors) == 2 and len(vectors[0]) == len(query) == embedder.dim
    assert query == pytest.approx(vectors[0], abs=1e-5)
