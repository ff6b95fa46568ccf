"""VectorIndex: flat and HNSW search, removal, atomic persistence, and refusal of foreign or mismatched dirs."""

import json

import numpy as np
import pytest

from kvblend.retrieval.chunker import ChunkerConfig, chunk_document
from kvblend.retrieval.corpus import Document, pydoc_topics
from kvblend.retrieval.embedder import Embedder
from kvblend.retrieval.ingest import index_documents
from kvblend.retrieval.vector_index import MANIFEST, IndexFormatError, VectorIndex

TOPICS = ("exceptions", "try", "integers", "lists", "with", "while")
CONFIG = ChunkerConfig(128)


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def corpus(tokenizer, embedder):
    """Chunks of a few language-reference topics and their embeddings, computed once."""
    chunks = [c for d in pydoc_topics(TOPICS) for c in chunk_document(tokenizer, d, CONFIG)]
    return chunks, embedder.embed([c.text for c in chunks])


@pytest.fixture(scope="module")
def query(embedder):
    return embedder.embed(["How do I catch an exception and handle the error?"])[0]


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.slow
def test_add_search_remove_and_reopen(tmp_path, embedder, corpus, query, kind):
    chunks, vectors = corpus
    index = VectorIndex.create(tmp_path / "idx", embedder.dim, embedder.name, kind=kind)
    assert index.add(chunks, vectors) == len(chunks)
    assert index.add(chunks[:5], vectors[:5]) == 0, "chunk ids already present are skipped"
    assert len(index) == len(chunks) and index.sources() == sorted(f"pydoc:{t}" for t in TOPICS)

    hits = index.search(query, 5)
    assert len(hits) == 5 and [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert hits[0][0].source in ("pydoc:exceptions", "pydoc:try")
    best = int(np.argmax(vectors @ query))
    assert hits[0][0] == chunks[best] and hits[0][1] == pytest.approx(float(vectors[best] @ query), abs=1e-5)

    index.save()
    reopened = VectorIndex.open(tmp_path / "idx", embedder=embedder)
    assert reopened.kind == kind and len(reopened) == len(chunks)
    assert reopened.chunks() == index.chunks() and reopened.chunks()[0].token_ids == index.chunks()[0].token_ids
    assert [(c, pytest.approx(s, abs=1e-6)) for c, s in reopened.search(query, 5)] == hits

    removed = sum(1 for c in chunks if c.source == "pydoc:exceptions")
    assert reopened.remove_source("pydoc:exceptions") == removed > 0
    assert reopened.remove_source("pydoc:exceptions") == 0
    assert all(c.source != "pydoc:exceptions" for c, _ in reopened.search(query, len(chunks)))
    assert len(reopened.search(query, len(chunks))) == len(chunks) - removed
    reopened.save()
    again = VectorIndex.open(tmp_path / "idx")
    assert len(again) == len(chunks) - removed and "pydoc:exceptions" not in again.sources()
    assert again.add(chunks, vectors) == removed, "removed chunks can be added back"


@pytest.mark.slow
def test_k_larger_than_index_and_empty_index(tmp_path, embedder, corpus, query):
    chunks, vectors = corpus
    for kind in ("flat", "hnsw"):
        index = VectorIndex.create(tmp_path / kind, embedder.dim, embedder.name, kind=kind)
        assert index.search(query, 3) == []
        index.add(chunks[:4], vectors[:4])
        assert len(index.search(query, 100)) == 4
        with pytest.raises(ValueError, match="k must be positive"):
            index.search(query, 0)
        with pytest.raises(ValueError, match="dim"):
            index.search(query[:10], 1)
        with pytest.raises(ValueError, match=r"\[2, 384\]"):
            index.add(chunks[:2], vectors[:3])
        empty = VectorIndex.open(tmp_path / kind)
        assert len(empty) == 0 and empty.search(query, 5) == []


@pytest.mark.slow
def test_missing_and_foreign_directories_are_refused_untouched(tmp_path, embedder):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        VectorIndex.open(tmp_path / "nowhere")

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("my notes")
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / MANIFEST).write_text(json.dumps({"name": "someone else's project", "version": 1}))
    (foreign / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = {d: snapshot(d) for d in (plain, foreign)}

    with pytest.raises(IndexFormatError, match=f"{plain}.*no {MANIFEST}"):
        VectorIndex.open(plain)
    with pytest.raises(IndexFormatError, match=f"{foreign}.*not a kvblend index manifest"):
        VectorIndex.open(foreign)
    for directory in (plain, foreign):
        with pytest.raises(FileExistsError, match=str(directory)):
            VectorIndex.create(directory, embedder.dim, embedder.name)
    assert {d: snapshot(d) for d in (plain, foreign)} == before

    VectorIndex.create(tmp_path / "mine", embedder.dim, embedder.name)
    with pytest.raises(FileExistsError, match="already holds an index"):
        VectorIndex.create(tmp_path / "mine", embedder.dim, embedder.name)
    manifest = json.loads((tmp_path / "mine" / MANIFEST).read_text())
    manifest["version"] = 99
    (tmp_path / "mine" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="version 99"):
        VectorIndex.open(tmp_path / "mine")


@pytest.mark.slow
def test_index_of_another_embedder_is_refused(tmp_path, embedder):
    VectorIndex.create(tmp_path / "idx", embedder.dim, "e5-small-0123456789ab")
    with pytest.raises(ValueError, match=f"e5-small-0123456789ab.*{embedder.name}"):
        VectorIndex.open(tmp_path / "idx", embedder=embedder)
    assert len(VectorIndex.open(tmp_path / "idx")) == 0
    with pytest.raises(ValueError, match="kind"):
        VectorIndex.create(tmp_path / "other", embedder.dim, embedder.name, kind="ivf")


@pytest.mark.slow
def test_failed_save_leaves_previous_index_readable(tmp_path, embedder, corpus, query):
    chunks, vectors = corpus
    index = VectorIndex.create(tmp_path / "idx", embedder.dim, embedder.name)
    index.add(chunks[:6], vectors[:6])
    index.save()
    saved = index.search(query, 3)
    index.add(chunks[6:], vectors[6:])
    blocker = tmp_path / "idx" / "vectors-000003.faiss"
    blocker.mkdir()  # the next generation's vectors file cannot be renamed into place: save fails midway
    with pytest.raises(OSError):
        index.save()
    survivor = VectorIndex.open(tmp_path / "idx")
    assert len(survivor) == 6 and survivor.search(query, 3) == saved
    blocker.rmdir()
    index.save()
    assert len(VectorIndex.open(tmp_path / "idx")) == len(chunks)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "chunks-000003.jsonl",
        MANIFEST,
        "vectors-000003.faiss",
    ], "older generations and temporary files are cleaned up"


@pytest.mark.slow
def test_index_documents_skips_known_chunks_and_replaces_changed_documents(tmp_path, tokenizer, embedder):
    docs = pydoc_topics(["try", "integers"])
    index = VectorIndex.create(tmp_path / "idx", embedder.dim, embedder.name)
    added = index_documents(index, embedder, tokenizer, docs, CONFIG)
    assert added == len(index) > 2
    assert index_documents(index, embedder, tokenizer, docs, CONFIG) == 0
    edited = Document(docs[1].source, "Integers are whole numbers without a fractional part.", docs[1].title)
    assert index_documents(index, embedder, tokenizer, [edited], CONFIG) == 1
    assert [c.text for c in index.chunks(edited.source)] == [edited.text]
    assert index.chunks("pydoc:try") == chunk_document(tokenizer, docs[0], CONFIG)
