"""KVBlendChatModel: a LangChain chat model answering through `kvblend serve`, so a chain gets blended prefill.

    model = KVBlendChatModel(base_url="http://127.0.0.1:8000/v1")
    chain = {"context": retriever | format_documents, "question": RunnablePassthrough()} | rag_prompt() | model

`documents=` (texts or LangChain Documents, in prompt order) names the prompt's retrieved documents to the
connector; without it the server finds stored chunks in the prompt by content hash. Every request carries a cache
salt of its own (its blended KV never reaches vLLM's prefix cache for other requests). The connector's report
is in `response_metadata["kvblend"]` (invoke), the prompt tokens the server did not prefill in
`response_metadata["cached_tokens"]` (invoke and stream).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.utils import convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from pydantic import Field, PrivateAttr

from kvblend.blend.prompt import DEFAULT_QUESTION_PREFIX, DEFAULT_SEPARATOR, DEFAULT_SYSTEM, chunk_text
from kvblend.client import blend_body, cached_tokens, kvblend_report


def format_documents(documents: Sequence[Any]) -> str:
    """Retrieved Documents as the prompt's context: each page_content without boundary whitespace followed by a
    blank line (the layout of `kvblend.client.rag_user_message`, so their stored chunks are found in it)."""
    return "".join(chunk_text(doc.page_content) + DEFAULT_SEPARATOR for doc in documents)


def rag_prompt(system: str = DEFAULT_SYSTEM) -> ChatPromptTemplate:
    """A ChatPromptTemplate of inputs `context` (from format_documents) and `question` in that layout."""
    return ChatPromptTemplate.from_messages(
        [("system", system), ("human", "{context}" + DEFAULT_QUESTION_PREFIX + "{question}")])


def document_payload(doc: Any) -> str | list[int]:
    """What the connector is told of one document: a kvblend Document's token ids (the ids its stored KV is keyed
    by), else its text."""
    if isinstance(doc, str):
        return doc
    metadata = getattr(doc, "metadata", None) or {}
    if metadata.get("token_ids"):
        return [int(t) for t in metadata["token_ids"]]
    return str(doc.page_content)


class KVBlendChatModel(BaseChatModel):
    """Chat completions from a `kvblend serve` server through the official `openai` client."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str = "none"
    model: str | None = None  # None: the server's (only) model
    max_tokens: int = Field(default=128, gt=0)
    sampling: dict[str, Any] = Field(default_factory=dict)  # OpenAI request fields over the server's defaults
    timeout_s: float = 600.0
    _client: Any = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "kvblend"

    @property
    def client(self):
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s)
        return self._client

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, documents: Sequence[Any] | None,
                 kwargs: dict[str, Any]) -> dict[str, Any]:
        model = self.model or self.client.models.list().data[0].id
        docs = None if documents is None else [document_payload(d) for d in documents]
        return {"model": model, "messages": convert_to_openai_messages(messages), "max_tokens": self.max_tokens,
                "stop": stop, "extra_body": blend_body(docs), **self.sampling, **kwargs}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, documents: Sequence[Any] | None = None,
                  **kwargs: Any) -> ChatResult:
        response = self.client.chat.completions.create(**self._request(messages, stop, documents, kwargs))
        choice = response.choices[0]
        metadata = {"kvblend": kvblend_report(response), "cached_tokens": cached_tokens(response.usage),
                    "finish_reason": choice.finish_reason, "model_name": response.model}
        message = AIMessage(content=choice.message.content or "", response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, documents: Sequence[Any] | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, documents, kwargs)
        stream = self.client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        for event in stream:
            if event.choices and event.choices[0].delta.content:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=event.choices[0].delta.content))
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            if event.usage is not None:
                yield ChatGenerationChunk(message=AIMessageChunk(
                    content="", response_metadata={"cached_tokens": cached_tokens(event.usage)}))
