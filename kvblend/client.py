"""Talking to `kvblend serve` with the official `openai` client: RAG messages, the kvblend request fields, storing
documents' KV through the server, and reading the connector's report.

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    store_documents(client, model, docs)                       # once per document: its KV computed alone, stored
    reply = client.chat.completions.create(model=model, messages=rag_messages(question, docs),
                                           extra_body=blend_body(docs))
    kvblend_report(reply)                                     # {"mode": "blend", "tokens_reused": ..., ...}

The convention: the documents sit in the last user turn without boundary whitespace, each followed by a blank
line, then "Question: ..." (kvblend.blend.prompt.user_message), and `kv_transfer_params.kvblend.documents` lists
them in the same order so the connector finds their token ids (the ids of each text alone, stripped: the chunk
recipe of kvblend.blend.prompt.chunk_token_ids) in the rendered prompt. Without that list the connector still
finds stored chunks by content hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvblend.blend.prompt import DEFAULT_SYSTEM, chunk_text, user_message
from kvblend.vllm.params import KEY, blend_salt


def rag_user_message(question: str, documents: Sequence[str]) -> str:
    """The user turn's text: every document (stripped) followed by a blank line, then the question."""
    return user_message(question, documents)


def rag_messages(question: str, documents: Sequence[str], system: str = DEFAULT_SYSTEM) -> list[dict[str, str]]:
    """Chat messages for a RAG question: the system turn, then one user turn with the documents and the question."""
    return [{"role": "system", "content": system}, {"role": "user", "content": rag_user_message(question, documents)}]


def blend_body(documents: Sequence[str] | None = None, **kvblend: Any) -> dict[str, Any]:
    """`extra_body` of a request the server should blend: its documents (texts or token-id lists, in prompt order;
    None: found by content hash), other kvblend request keys (mode, policy, ratio, namespace), and a cache salt of
    its own so its blended KV never serves another request from vLLM's prefix cache."""
    params = dict(kvblend)
    if documents is not None:
        params["documents"] = [doc if isinstance(doc, str) else [int(t) for t in doc] for doc in documents]
    return {"kv_transfer_params": {KEY: params}, "cache_salt": blend_salt()}


def plain_body() -> dict[str, Any]:
    """`extra_body` of a request served as plain vLLM (the connector stays out of it), e.g. for comparisons."""
    return {"kv_transfer_params": {KEY: {"mode": "off"}}}


def store_documents(client, model: str, documents: Sequence[str]) -> None:
    """Compute and store each document's KV alone through the server (one batched completion request; documents
    already stored are not stored again). Each is sent as its `chunk_text` without special tokens, so its key is
    the one the connector makes for a named document and the chunker for an indexed chunk."""
    if not documents:
        return
    client.completions.create(model=model, prompt=[chunk_text(d) for d in documents], max_tokens=1, temperature=0.0,
                              extra_body={"kv_transfer_params": {KEY: {"store_prompt": True}},
                                          "add_special_tokens": False})


def kvblend_report(response) -> dict[str, Any]:
    """The connector's report of a non-streaming response ({} if it did not take part)."""
    extra = getattr(response, "model_extra", None) or {}
    return dict((extra.get("kv_transfer_params") or {}).get(KEY) or {})


def cached_tokens(usage) -> int:
    """Prompt tokens vLLM did not prefill itself (its prefix cache plus what the connector supplied), from a
    response's or a stream's final `usage` (the server reports them: `--enable-prompt-tokens-details`)."""
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", 0) or 0)
