"""`kvblend serve` as users serve it: the official `openai` client (streaming and not), documents named over the
OpenAI API, discovery by content hash, the default sampling, a LangChain chain on KVBlendChatModel, the report
every kvblend request gets, and a Redis tier behind a password. One server for the whole module (a start costs
about 30 s on 2 cores), started as documented: its KV space sized by kvblend, not by VLLM_CPU_KVCACHE_SPACE."""

import asyncio
import json
import os
import re
import time
import urllib.request

import pytest

from kvblend.client import (
    blend_body,
    cached_tokens,
    kvblend_report,
    plain_body,
    rag_messages,
    rag_user_message,
    store_documents,
)
from kvblend.rag.config import ENGINE_REDIS_URL_ENV
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.server import ServerProcess

pytestmark = pytest.mark.slow  # starts vLLM behind the OpenAI-compatible server

TOPICS = ["pass", "break", "continue", "del"]
REDIS_PASSWORD = "serve-redis-s3cret"


@pytest.fixture(scope="module")
def redis_with_password():
    """A private redis-server that requires a password, and its URL (the password in it)."""
    from redis_server import RedisServer

    with RedisServer() as redis_server:
        with redis_server.client() as admin:
            admin.config_set("requirepass", REDIS_PASSWORD)
        yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0"


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_with_password):
    root = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name in ("TRITON_INTERPRET", "KVBLEND_REDIS_URL", "VLLM_CPU_KVCACHE_SPACE", ENGINE_REDIS_URL_ENV):
        env.pop(name, None)
    with ServerProcess(["--store", str(root / "store"), "--redis", redis_with_password], log_path=root / "server.log",
                       env=env) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="none", timeout=300)


@pytest.fixture(scope="module")
def documents(server, client):
    """Short language-reference topics, their KV stored through the server."""
    docs = [d.text.strip() for d in pydoc_topics(TOPICS)]
    store_documents(client, server.model, docs)
    return docs


def metric(server, name: str, label: str = "") -> float:
    """The value of `name` on the server's /metrics, summed over its label sets (those holding `label`, e.g.
    'tier="memory"', if given)."""
    with urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.MULTILINE)
    return sum(float(value) for labels, value in found if label in labels)


def test_chat_streams_an_answer_blending_the_named_documents(server, client, documents):
    question = "What does the break statement do?"
    docs = [documents[1], documents[0], documents[2]]  # an order never prefilled together
    hits_before = metric(server, "vllm:external_prefix_cache_hits_total")
    stream = client.chat.completions.create(model=server.model, messages=rag_messages(question, docs), max_tokens=24,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=blend_body(docs))
    text, usage = [], None
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            text.append(event.choices[0].delta.content)
        usage = event.usage or usage
    assert "".join(text).strip(), "the streamed answer arrived"
    reused = cached_tokens(usage)
    assert reused > sum(len(d) for d in docs) // 8, "the usage counts the documents' tokens as not prefilled"
    assert metric(server, "vllm:external_prefix_cache_hits_total") - hits_before == reused

    reply = client.chat.completions.create(model=server.model, messages=rag_messages(question, docs), max_tokens=24,
                                           extra_body=blend_body(docs))
    report = kvblend_report(reply)
    assert report["documents"] == report["documents_found"] == 3
    assert report["mode"] == "blend" and report["chunks"] == 3
    assert 0 < report["tokens_recomputed"] < report["tokens_reused"]
    assert reply.choices[0].message.content.strip()


def test_completions_blend_named_documents_and_chat_finds_stored_chunks_without_them(server, client, documents):
    docs = [documents[3], documents[1]]
    prompt = rag_user_message("When is del useful?", docs)
    reply = client.completions.create(model=server.model, prompt=prompt, max_tokens=8, extra_body=blend_body(docs))
    report = kvblend_report(reply)
    assert report["mode"] == "blend" and report["chunks"] == report["documents_found"] == 2
    assert reply.choices[0].text.strip()

    unnamed = client.chat.completions.create(model=server.model, messages=rag_messages("What does pass do?", docs),
                                             max_tokens=8, extra_body=blend_body())
    found = kvblend_report(unnamed)
    assert found["mode"] == "blend" and found["chunks"] == 2 and "documents" not in found, "discovered by hash"


def test_plain_requests_and_bad_documents_are_plain_vllm(server, client, documents):
    reply = client.chat.completions.create(model=server.model, messages=rag_messages("What is pass?", documents[:2]),
                                           max_tokens=8, extra_body=plain_body())
    assert reply.choices[0].message.content.strip() and kvblend_report(reply) == {}, "mode off: kvblend stays out"
    absent = client.chat.completions.create(model=server.model, messages=rag_messages("What is pass?", documents[:1]),
                                            max_tokens=8, extra_body=blend_body(["a document that is not in it"]))
    report = kvblend_report(absent)
    assert report["documents"] == 1 and report["documents_found"] == 0 and not report.get("chunks")


def test_every_kvblend_request_is_told_why_nothing_was_reused(server, client, documents):
    unstored = " ".join(["A paragraph about lighthouses that no one stored, long enough to be a chunk."] * 3)
    cases = [  # (extra_body, documents in the prompt, reason)
        (blend_body(["a document that is not in it"]), documents[:1], "not_located"),
        (blend_body([unstored]), [unstored], "not_stored"),
        # the gate's raise above a bound every blend exceeds, doubling ratio 0.5 to a full prefill
        (blend_body(documents[:2], ratio=0.5, gate_raise=1e-6), documents[:2], "gate"),
    ]
    for body, docs, reason in cases:
        reply = client.chat.completions.create(model=server.model, messages=rag_messages("What is pass?", docs),
                                               max_tokens=4, extra_body=body)
        report = kvblend_report(reply)
        assert report.get("reason") == reason and report["detail"] and report["mode"], json.dumps(report)
        assert reply.choices[0].message.content.strip()
    assert report["gate"]["decision"] == "full_prefill" and report["chunks"] == 2


def test_the_redis_url_reaches_the_engine_through_its_environment(server, documents, redis_with_password):
    """`--redis` with a password: the engine's connector writes the stored documents to Redis, and the password
    is nowhere in the server's log (vLLM logs the connector config, which names the variable instead)."""
    import redis

    with redis.Redis.from_url(redis_with_password, socket_timeout=10) as tier:
        assert tier.dbsize() > 0, "the documents' KV reached the Redis tier"
    log = server.log_tail(10**8)
    assert ENGINE_REDIS_URL_ENV in log and REDIS_PASSWORD not in log


def test_default_sampling_does_not_loop(server, client):
    reply = client.chat.completions.create(model=server.model, max_tokens=96, messages=[
        {"role": "user", "content": "What is the difference between a lambda expression and a function definition?"}])
    words = reply.choices[0].message.content.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    assert len(words) > 20 and max(grams.count(g) for g in grams) <= 2, reply.choices[0].message.content


def test_langchain_chat_model_in_lcel_chains(server, documents):
    from langchain_core.documents import Document
    from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

    from kvblend.langchain_chat import KVBlendChatModel, format_documents, rag_prompt

    by_question = {"What does continue do?": documents[2:0:-1], "What does pass do?": documents[:2]}
    retriever = RunnableLambda(lambda q: [Document(page_content=d) for d in by_question[q]])
    model = KVBlendChatModel(base_url=server.base_url, max_tokens=16)
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | rag_prompt() | model

    message = chain.invoke("What does continue do?")
    assert message.content.strip() and message.response_metadata["kvblend"]["chunks"] == 2
    batch = chain.batch(list(by_question))
    assert all(m.content.strip() and m.response_metadata["kvblend"]["mode"] == "blend" for m in batch)
    again = asyncio.run(chain.ainvoke("What does pass do?"))
    assert again.response_metadata["kvblend"]["chunks"] == 2
    both = RunnableParallel(answer=chain, sources=retriever).invoke("What does pass do?")
    assert both["answer"].content.strip() and len(both["sources"]) == 2
    streamed = list(chain.stream("What does continue do?"))
    assert "".join(c.content for c in streamed).strip()
    assert sum(c.response_metadata.get("cached_tokens", 0) for c in streamed) > 0

    named = model.invoke(rag_messages("What does pass do?", documents[:2]), documents=documents[:2])
    assert named.response_metadata["kvblend"]["documents_found"] == 2


def test_a_request_without_kvblend_parameters_is_not_blended(server, client, documents):
    """A plain OpenAI client sends no kvblend parameters: served exactly (the server runs without
    --discover-blend), although its prompt holds stored chunks that `blend_body()` blends. The blended request
    runs first: the plain one stores its prompt's exact prefix spans, which a later request would reuse exactly
    instead of blending."""
    messages = rag_messages("Which statement does nothing?", documents[:2])
    asked = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8,
                                           extra_body=blend_body())
    assert kvblend_report(asked)["mode"] == "blend" and kvblend_report(asked)["chunks"] == 2
    unasked = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0.0)
    assert unasked.choices[0].message.content.strip()
    assert kvblend_report(unasked).get("mode") != "blend" and not kvblend_report(unasked).get("chunks")


def test_doc_snippets_run_against_the_server(server, documents):
    """The python blocks of examples/serve.md and the README's client block, as written, in one namespace,
    talking to this module's server. What the docs leave to the reader is defined here: `docs`, `question`,
    a LangChain `retriever` over them, and chat `messages`."""
    from doc_snippets import DOC_SERVER_URL, blocks_run_by
    from langchain_core.documents import Document
    from langchain_core.runnables import RunnableLambda

    docs = documents[:3]
    namespace = {"docs": docs, "question": "What does the pass statement do?",
                 "retriever": RunnableLambda(lambda q: [Document(page_content=d) for d in docs]),
                 "messages": rag_messages("What does the pass statement do?", docs)}
    for doc, code in blocks_run_by("test_doc_snippets_run_against_the_server"):
        exec(compile(code.replace(DOC_SERVER_URL, server.base_url), doc, "exec"), namespace)
    assert kvblend_report(namespace["reply"])["mode"] == "blend"
    assert namespace["message"].response_metadata["kvblend"]["mode"] == "blend"


KVBLEND_METRICS = ["kvblend:requests_total", "kvblend:matched_tokens_total", "kvblend:tokens_reused_total",
                   "kvblend:tokens_recomputed_total", "kvblend:blend_seconds_count", "kvblend:gate_decisions_total",
                   "kvblend:controller_decisions_total", "kvblend:tier_hits_total", "kvblend:tier_bytes_read_total"]


def test_kvblend_metrics_on_vllms_metrics_endpoint(server, client, documents):
    """kvblend's counters reach vLLM's own /metrics (the KV-connector stats interface) after a blended request:
    its mode, matched and reused tokens, blend time, gate and controller decisions, and the tiers' reads."""
    before = {name: metric(server, name) for name in KVBLEND_METRICS}
    blends_before = metric(server, "kvblend:requests_total", 'mode="blend"')
    docs = [documents[2], documents[3]]
    reply = client.chat.completions.create(model=server.model, messages=rag_messages("What does del do?", docs),
                                           max_tokens=4, extra_body=blend_body(docs))
    report = kvblend_report(reply)
    assert report["mode"] == "blend" and report["tokens_reused"] > 0
    deadline = time.monotonic() + 30  # the API server records each engine step's stats as its output arrives
    while metric(server, "kvblend:blend_seconds_count") == before["kvblend:blend_seconds_count"]:
        assert time.monotonic() < deadline, "no blend reached /metrics"
        time.sleep(0.5)
    after = {name: metric(server, name) for name in KVBLEND_METRICS}
    grew = {name: after[name] - before[name] for name in KVBLEND_METRICS}
    assert metric(server, "kvblend:requests_total", 'mode="blend"') - blends_before == 1
    assert grew["kvblend:matched_tokens_total"] == report["matched_tokens"]
    assert grew["kvblend:tokens_reused_total"] == report["tokens_reused"]
    assert grew["kvblend:tokens_recomputed_total"] == report["tokens_recomputed"]
    assert grew["kvblend:blend_seconds_count"] == grew["kvblend:gate_decisions_total"] == 1
    assert grew["kvblend:controller_decisions_total"] == 1
    assert grew["kvblend:tier_hits_total"] > 0 and grew["kvblend:tier_bytes_read_total"] > 0
    assert metric(server, "kvblend:tier_bytes_written_total", 'tier="disk"') > 0  # the documents were stored
