"""Documents sent as text are found every time: a corpus whose chunks end at paragraph breaks, blank lines, code
blocks and non-ASCII text is precomputed offline (`kvblend precompute`, the torch runner), then its chunks' texts
go through `kvblend serve` with the official `openai` client (chat and completions, named and discovered) and
`KVBlendChatModel`; documents stored through the server (`store_documents`) are found the same way. One server for
the module."""

import os
import random

import pytest
from text_corpus import CHUNK_TOKENS, DOCUMENTS

from kvblend.client import blend_body, kvblend_report, rag_messages, rag_user_message, store_documents
from kvblend.retrieval.chunker import ChunkerConfig, chunk_document
from kvblend.server import ServerProcess

pytestmark = pytest.mark.slow  # runs the torch runner and starts vLLM behind the OpenAI-compatible server

QUESTION = "What does the text say?"
DISCOVERABLE = 32  # ConnectorConfig.min_chunk_tokens: shorter chunks are found only when named


@pytest.fixture(scope="module")
def chunks(tokenizer):
    return [c for doc in DOCUMENTS for c in chunk_document(tokenizer, doc, ChunkerConfig(CHUNK_TOKENS))]


@pytest.fixture(scope="module")
def server(tmp_path_factory, chunks):
    """A server on a store that `kvblend precompute` filled with the corpus's chunks (no index)."""
    from kvblend.cli import main

    root = tmp_path_factory.mktemp("text-roundtrip")
    for doc in DOCUMENTS:
        (root / doc.source).write_text(doc.text, encoding="utf-8")
    store = root / "store"
    files = [str(root / doc.source) for doc in DOCUMENTS]
    assert main(["precompute", *files, "--store", str(store), "--chunk-tokens", str(CHUNK_TOKENS)]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # kvblend serve sizes the KV space itself
    env.pop("TRITON_INTERPRET", None)
    env.pop("KVBLEND_REDIS_URL", None)
    with ServerProcess(["--store", str(store)], log_path=root / "server.log", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="none", timeout=300)


def groups(chunks: list, size: int, seed: int) -> list[list]:
    """Every chunk once, in random groups of `size` in a random order (orders never prefilled together)."""
    order = random.Random(seed).sample(chunks, len(chunks))
    return [order[i : i + size] for i in range(0, len(order), size)]


def discoverable(group: list) -> int:
    return sum(len(c.token_ids) >= DISCOVERABLE for c in group)


def test_openai_chat_and_completions_find_every_precomputed_chunk_sent_as_text(server, client, chunks):
    assert len(chunks) >= 8 and sum(discoverable([c]) for c in chunks) >= 8
    for group in groups(chunks, 4, seed=1):
        texts = [c.text + "\n\n" for c in group]  # clients keep whatever whitespace their documents came with
        reply = client.chat.completions.create(model=server.model, messages=rag_messages(QUESTION, texts),
                                               max_tokens=1, extra_body=blend_body(texts))
        report = kvblend_report(reply)
        assert report["documents"] == report["documents_found"] == len(group), report
        assert report["mode"] == "blend" and report["chunks"] == len(group), report

        found = kvblend_report(client.chat.completions.create(
            model=server.model, messages=rag_messages(QUESTION, texts), max_tokens=1, extra_body=blend_body()))
        assert found.get("chunks", 0) == discoverable(group), ("discovered by content hash", found)

    group = [c.text for c in groups(chunks, 3, seed=2)[0]]
    reply = client.completions.create(model=server.model, prompt=rag_user_message(QUESTION, group), max_tokens=1,
                                      extra_body=blend_body(group))
    report = kvblend_report(reply)
    assert report["documents_found"] == report["chunks"] == len(group), report


def test_langchain_chat_model_finds_every_chunk_named_and_discovered(server, chunks):
    from langchain_core.documents import Document
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    from kvblend.langchain_chat import KVBlendChatModel, format_documents, rag_prompt

    model = KVBlendChatModel(base_url=server.base_url, max_tokens=1)
    group = [c.text for c in groups(chunks, 4, seed=3)[0]]
    named = model.invoke(rag_messages(QUESTION, group), documents=group)
    assert named.response_metadata["kvblend"]["documents_found"] == len(group)

    group = groups(chunks, 4, seed=4)[0]
    docs = [Document(page_content="\n" + c.text + "\n\n") for c in group]
    chain = {"context": RunnableLambda(lambda q: docs) | format_documents,
             "question": RunnablePassthrough()} | rag_prompt() | model
    report = chain.invoke(QUESTION).response_metadata["kvblend"]
    assert report.get("chunks", 0) == discoverable(group), report


def test_documents_stored_through_the_server_are_found_as_text(server, client, tokenizer):
    from text_corpus import CODE, UNICODE

    from kvblend.retrieval.corpus import Document

    docs = [c.text + " \n" for d in (Document("u2", UNICODE[::-1]), Document("c2", CODE.upper()))
            for c in chunk_document(tokenizer, d, ChunkerConfig(CHUNK_TOKENS))][:4]
    store_documents(client, server.model, docs)
    reply = client.chat.completions.create(model=server.model, messages=rag_messages(QUESTION, docs[::-1]),
                                           max_tokens=1, extra_body=blend_body(docs[::-1]))
    report = kvblend_report(reply)
    assert report["documents_found"] == report["chunks"] == len(docs), report
