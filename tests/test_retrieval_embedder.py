"""Embedder: the bundled all-MiniLM-L6-v2 on CPU gives unit-norm float32 vectors that rank by meaning."""

import numpy as np
import pytest

from kvblend.retrieval.chunker import ChunkerConfig, chunk_document
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.retrieval.embedder import Embedder, default_model_dir


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.mark.slow
def test_vectors_are_unit_norm_float32(embedder):
    vectors = embedder.embed(["The try statement handles exceptions.", "Integers are whole numbers.", "x"])
    assert embedder.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.embed("a bare string")


@pytest.mark.slow
def test_name_is_stable_and_says_which_model(embedder):
    assert embedder.name.startswith("all-MiniLM-L6-v2-")
    assert Embedder(default_model_dir()).name.endswith(embedder.name.rsplit("-", 1)[1])
    assert Embedder().name == embedder.name


@pytest.mark.slow
def test_query_about_exceptions_ranks_exception_chunks_first(embedder, tokenizer):
    docs = pydoc_topics(["exceptions", "integers", "lists"])
    first = {d.title: chunk_document(tokenizer, d, ChunkerConfig(128))[0] for d in docs}
    chunk_vectors = embedder.embed([c.text for c in first.values()])
    query = embedder.embed(["How are errors raised and handled with exception handlers?"])[0]
    scores = dict(zip(first, chunk_vectors @ query))
    assert scores["exceptions"] > scores["integers"] and scores["exceptions"] > scores["lists"], scores


def test_missing_or_invalid_model_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Embedder(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a sentence-transformers model directory"):
        Embedder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load"):
        Embedder(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(batch_size=0)
