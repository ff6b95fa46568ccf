"""RAGPipeline: documents in, answers out, with retrieved chunks' KV reused (CacheBlend) inside vLLM.

    with RAGPipeline.from_defaults() as rag:          # embedded SmolLM2 + MiniLM, index and store under ~/.cache
        rag.add_documents([Path("docs/")])            # chunk, embed, index, precompute each new chunk's KV
        result = rag.query("How do I ...?")           # answer, sources, stats (TTFT, tokens reused/recomputed)

Everything a call needs is checked before the vLLM engine starts; the engine starts on first use.

Threads and asyncio: vLLM's offline `LLM` takes one caller at a time (two threads in `generate` at once corrupt
its engine-core socket and hang the engine), so every call into it holds the pipeline's engine lock; calls from
several threads (a LangChain chain's `batch`, a web server's workers) take turns, each a whole generate call.
A stream holds the lock from its first delta until it is read to the end, closed, or dropped: other threads wait
for it, and the thread reading it gets a RuntimeError if it calls into the engine meanwhile (rather than
deadlock). `aquery`, `aquery_batch` and `aanswer` run the same calls in a worker thread for asyncio code.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from kvblend.blend.prompt import chat_template
from kvblend.model.embedded import resolve_model_dir
from kvblend.model.spec import model_fingerprint
from kvblend.model.tokenizer import encode, load_tokenizer
from kvblend.rag.answer import QueryResult, Source, query_stats
from kvblend.rag.config import PipelineConfig, require_redis
from kvblend.rag.documents import DocumentInput, as_documents
from kvblend.rag.engine import start_llm, stop_llm, stream_outputs, warm_up
from kvblend.rag.index_updates import index_exists, open_index, update_index
from kvblend.rag.prompt import RagPrompt, build_rag_prompt
from kvblend.retrieval import Chunk, ChunkerConfig, Embedder, VectorIndex, cache_key_fn
from kvblend.store.key import ChunkKey
from kvblend.vllm.params import blend_salt

log = logging.getLogger(__name__)
PRECOMPUTE_BATCH = 64  # chunk prompts per generate call: vLLM batches them; the progress bar moves per call
STORE_WAIT_S = 60.0  # how long precompute waits for the engine's background store writes to become visible


@dataclass(frozen=True)
class AddSummary:
    documents: int
    chunks: int  # chunks of these documents now in the index
    chunks_added: int  # of which new to the index
    chunks_precomputed: int  # chunks whose KV was stored now, counted in the store afterwards


@dataclass(frozen=True)
class _Request:
    """A prompt ready for the engine and the chunks it holds."""

    question: str
    prompt: RagPrompt
    sources: list[Source]


class AnswerStream:
    """Iterate to get the answer's text deltas as vLLM generates them; `result` is the QueryResult once done.
    From its first delta until it ends, is closed (`close()`, or leaving `with rag.stream(q) as s:`) or is
    dropped, the stream holds the pipeline's engine: other threads' calls wait for it."""

    def __init__(self, pipeline: RAGPipeline, request: _Request, blend: bool, params) -> None:
        self._pipeline, self._request, self._blend, self._params = pipeline, request, blend, params
        self._deltas: Iterator[str] | None = None
        self.result: QueryResult | None = None

    def __iter__(self) -> Iterator[str]:
        if self._deltas is not None:
            raise RuntimeError("an AnswerStream is read once; call RAGPipeline.stream again for a new answer")
        self._deltas = self._read()
        return self._deltas

    def close(self) -> None:
        """Abort the request if it is still running and give the engine back to the other callers."""
        if self._deltas is not None:
            self._deltas.close()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> Iterator[str]:
        from vllm.sampling_params import RequestOutputKind

        pipeline, request = self._pipeline, self._request
        params = self._params
        params.output_kind = RequestOutputKind.DELTA
        text, token_ids, output = [], 0, None
        with pipeline._engine() as llm:
            pipeline._stream_reader = threading.get_ident()
            try:
                prompt = pipeline._engine_prompt(request.prompt, self._blend)
                with closing(stream_outputs(llm, prompt, params)) as outputs:
                    for output in outputs:
                        delta = output.outputs[0]
                        token_ids += len(delta.token_ids)
                        if delta.text:
                            text.append(delta.text)
                            yield delta.text
            finally:
                pipeline._stream_reader = None
        if output is None or not output.finished:
            raise RuntimeError("the vLLM engine ended the streamed request before it finished")
        stats = query_stats(output, len(request.prompt.token_ids), token_ids)
        self.result = QueryResult(request.question, "".join(text), request.sources, stats)


class RAGPipeline:
    """Index documents, precompute their chunks' KV through vLLM, and answer questions with blended KV."""

    def __init__(self, config: PipelineConfig | None = None, **settings: Any) -> None:
        """`settings` are PipelineConfig fields (model_dir, index_dir, store_dir, redis_url, policy, ratio,
        top_k, chunk_tokens, engine_args, ...), applied over `config`."""
        self.config = replace(config, **settings) if config is not None else PipelineConfig(**settings)
        if self.config.redis_url:
            require_redis(self.config.redis_url)
        self.index: VectorIndex | None = None
        if index_exists(self.config.index_dir):
            self.index = open_index(self.config.index_dir)
        self.model_dir = resolve_model_dir(self.config.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.template = chat_template(self.tokenizer, system=self.config.system_prompt)
        self.separator = encode(self.tokenizer, self.config.separator)
        self.fingerprint = model_fingerprint(self.model_dir, self.config.dtype)
        self.namespace = self.config.key_namespace()  # where this pipeline's chunk keys live (its tenant's)
        self.key_for = cache_key_fn(self.fingerprint, self.namespace)
        self.chunker = ChunkerConfig(chunk_tokens=self.config.chunk_tokens)
        self._embedder: Embedder | None = None
        self._llm = None
        self._store = None
        self._engine_lock = threading.Lock()  # one caller on the engine at a time (see the module docstring)
        self._stream_reader: int | None = None  # the thread reading an open stream, which holds _engine_lock
        self._parts_lock = threading.RLock()  # the lazily loaded embedder, store and index, and index updates

    @classmethod
    def from_defaults(cls, **settings: Any) -> RAGPipeline:
        """The embedded SmolLM2 and MiniLM, index and store under kvblend's cache dir (KVBLEND_CACHE_DIR)."""
        return cls(PipelineConfig(**settings))

    # -- lazily loaded parts ------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        with self._parts_lock:
            if self._embedder is None:
                embedder = Embedder()
                if self.index is not None:
                    self.index.check_embedder(embedder)
                self._embedder = embedder
        return self._embedder

    @property
    def llm(self):
        """The vLLM engine with the kvblend connector, started (and warmed up) on first use. Calls made on it
        directly bypass the pipeline's engine lock: make them from one thread, or use the pipeline's methods."""
        with self._engine() as llm:
            return llm

    @contextmanager
    def _engine(self) -> Iterator[Any]:
        """The started engine, for this thread alone until the block ends; other threads wait. The thread that
        reads an open stream gets a RuntimeError instead (the stream holds the engine)."""
        if self._stream_reader == threading.get_ident():
            raise RuntimeError("a stream of this pipeline is still being read in this thread; finish or close it "
                               "first")
        with self._engine_lock:
            if self._llm is None:
                llm = start_llm(self.model_dir, self.config)
                try:
                    warm_up(llm, self.tokenizer, self.template)
                except BaseException:
                    stop_llm(llm)
                    raise
                self._llm = llm
            yield self._llm

    @property
    def store(self):
        """This process's view of the connector's persistent tiers (disk, Redis), for presence checks and stats."""
        with self._parts_lock:
            if self._store is None:
                from kvblend.store import open_store

                self._store = open_store(self.config.store_config())
        return self._store

    # -- documents ----------------------------------------------------------------------------------------
    def add_documents(self, items: DocumentInput | Iterable[DocumentInput], precompute: bool = True,
                      progress: bool = False) -> AddSummary:
        """Chunk, embed and index documents (Documents, texts, or file/directory Paths), then compute the KV of
        every chunk the store lacks through vLLM (`progress`: a progress bar on stderr). Unchanged documents cost
        nothing; safe to run again."""
        docs = as_documents(items)
        with self._parts_lock:
            if self.index is None:
                self.index = VectorIndex.create(self.config.index_dir, self.embedder.dim, self.embedder.name)
            added, chunks = update_index(self.index, self.embedder, self.tokenizer, docs, self.chunker)
        done = self.precompute(chunks, progress=progress) if precompute else 0
        return AddSummary(documents=len(docs), chunks=len(chunks), chunks_added=added, chunks_precomputed=done)

    def precompute(self, chunks: Sequence[Chunk], progress: bool = False) -> int:
        """Store the KV of the chunks the store lacks: each is a prompt of its own (max_tokens=1) whose KV the
        connector extracts (never blended, even when it holds another stored chunk), PRECOMPUTE_BATCH prompts per
        generate call, which vLLM schedules together (many chunks per engine step). Returns how many of them the
        store holds afterwards (also a CachedRetriever hook)."""
        from vllm import SamplingParams

        from kvblend.vllm.params import request_params

        missing: dict[str, Chunk] = {}
        keys: list[ChunkKey] = []
        for chunk in chunks:
            key = ChunkKey.alone(self.fingerprint, chunk.token_ids, self.namespace)
            if key.digest not in missing and not self.store.contains(key):
                missing[key.digest] = chunk
                keys.append(key)
        if not missing:
            return 0
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": request_params(
            self.config.namespace, self.config.tenant_secret, store_prompt=True)})
        todo = list(missing.values())
        with self._engine() as llm, tqdm(total=len(todo), unit="chunk", desc="precompute", disable=not progress,
                                         file=sys.stderr) as bar:
            for i in range(0, len(todo), PRECOMPUTE_BATCH):
                batch = todo[i : i + PRECOMPUTE_BATCH]
                llm.generate([{"prompt_token_ids": list(c.token_ids)} for c in batch], params, use_tqdm=False)
                bar.update(len(batch))
        return self._count_stored(keys)

    def _count_stored(self, keys: list[ChunkKey]) -> int:
        """How many of `keys` the store holds once the engine's writes have landed (its worker writes the
        persistent tiers in the background): checked until all are there or STORE_WAIT_S has passed."""
        deadline = time.monotonic() + STORE_WAIT_S
        pending = keys
        while True:
            pending = [key for key in pending if not self.store.holds(key)]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if pending:
            log.warning("%d of %d chunks computed through vLLM are not in the store %.0f s later (the engine's log "
                        "says why); add the documents again to retry them", len(pending), len(keys), STORE_WAIT_S)
        return len(keys) - len(pending)

    # -- questions ----------------------------------------------------------------------------------------
    def retrieve(self, question: str, top_k: int | None = None) -> list[tuple[Chunk, float]]:
        """The top_k chunks for a question, best first (top_k over the index size is clamped, with a warning)."""
        _check_question(question)
        k = self.config.top_k if top_k is None else top_k
        if k <= 0:
            raise ValueError(f"top_k must be positive, got {k}")
        with self._parts_lock:
            if self.index is None:
                self.index = open_index(self.config.index_dir)
        if len(self.index) == 0:
            raise ValueError(f"index {self.index.path} holds no chunks; add documents first")
        if k > len(self.index):
            k, asked = len(self.index), k
            log.warning("top_k %d is more than the %d chunks in the index; using %d", asked, k, k)
        return self.index.search(self.embedder.embed([question])[0], k)

    def _request(self, question: str, chunks: Sequence[tuple[Sequence[int], Source]]) -> _Request:
        """The prompt for `question` over `chunks`. As soon as the chunks are known their KV starts moving: the
        disk tier's files into the page cache here (the engine's scheduler then prefetches into its memory tier)."""
        _check_question(question)
        self.store.warm(ChunkKey.alone(self.fingerprint, ids, self.config.namespace) for ids, _ in chunks)
        prompt = build_rag_prompt(self.template, [ids for ids, _ in chunks], self.separator,
                                  encode(self.tokenizer, question))
        return _Request(question, prompt, [source for _, source in chunks])

    def _retrieved_request(self, question: str, top_k: int | None) -> _Request:
        hits = self.retrieve(question, top_k)
        return self._request(question, [(c.token_ids, Source(c.chunk_id, c.source, c.title, c.index, s))
                                        for c, s in hits])

    def _sampling_params(self, prompt: RagPrompt, blend: bool, sampling: dict[str, Any]):
        """config.sampling and config.max_tokens; `sampling` overrides any SamplingParams field."""
        from vllm import SamplingParams

        from kvblend.vllm.params import blend_params

        if "extra_args" in sampling:
            raise ValueError("extra_args is set by the pipeline (it carries the kvblend parameters)")
        values = {**self.config.sampling, "max_tokens": self.config.max_tokens, **sampling}
        total = len(prompt.token_ids) + values["max_tokens"]
        if total > self.config.max_model_len:
            raise ValueError(f"prompt of {len(prompt.token_ids)} tokens + max_tokens {values['max_tokens']} exceeds "
                             f"max_model_len {self.config.max_model_len}; lower top_k or max_tokens")
        if blend:
            kv = blend_params(prompt.spans, self.config.namespace, self.config.tenant_secret,
                              policy=self.config.policy, ratio=self.config.ratio,
                              gate_bound="off" if self.config.gate_bound is None else self.config.gate_bound,
                              gate_raise="off" if self.config.gate_raise is None else self.config.gate_raise)
        else:
            kv = {"kvblend": {"mode": "off"}}
        return SamplingParams(**values, extra_args={"kv_transfer_params": kv})

    @staticmethod
    def _engine_prompt(prompt: RagPrompt, blend: bool) -> dict:
        salt = {"cache_salt": blend_salt()} if blend else {}
        return {"prompt_token_ids": prompt.token_ids, **salt}

    def _generate(self, requests: list[_Request], blend: bool, sampling: dict[str, Any]) -> list[QueryResult]:
        params = [self._sampling_params(r.prompt, blend, sampling) for r in requests]
        with self._engine() as llm:
            outputs = llm.generate([self._engine_prompt(r.prompt, blend) for r in requests], params, use_tqdm=False)
        results = []
        for request, output in zip(requests, outputs):
            completion = output.outputs[0]
            stats = query_stats(output, len(request.prompt.token_ids), len(completion.token_ids))
            results.append(QueryResult(request.question, completion.text, request.sources, stats))
        return results

    def query(self, question: str, top_k: int | None = None, blend: bool = True, **sampling: Any) -> QueryResult:
        """Retrieve, then generate with the chunks' KV blended (blend=False: plain vLLM, for comparison).
        `sampling` are SamplingParams fields over config.sampling (greedy, frequency penalty) and
        config.max_tokens."""
        return self._generate([self._retrieved_request(question, top_k)], blend, sampling)[0]

    def query_batch(self, questions: Sequence[str], top_k: int | None = None, blend: bool = True,
                    **sampling: Any) -> list[QueryResult]:
        """`query` for several questions in one batched generate call."""
        if isinstance(questions, str) or not questions:
            raise ValueError("query_batch takes a non-empty list of questions")
        return self._generate([self._retrieved_request(q, top_k) for q in questions], blend, sampling)

    def stream(self, question: str, top_k: int | None = None, blend: bool = True, **sampling: Any) -> AnswerStream:
        """Like `query`, but iterate the returned AnswerStream for text deltas; its `result` is set at the end."""
        request = self._retrieved_request(question, top_k)
        return AnswerStream(self, request, blend, self._sampling_params(request.prompt, blend, sampling))

    def answer(self, question: str, documents: Sequence[Any], blend: bool = True, **sampling: Any) -> QueryResult:
        """Generate from given chunks, in the given order: LangChain Documents carrying kvblend metadata
        (from KVBlendRetriever or CachedRetriever) or kvblend Chunks. Lets a LangChain chain use kvblend."""
        chunks = [self._chunk_of(i, doc) for i, doc in enumerate(documents)]
        return self._generate([self._request(question, chunks)], blend, sampling)[0]

    async def aquery(self, question: str, top_k: int | None = None, blend: bool = True, **sampling: Any) -> QueryResult:
        """`query` for asyncio code: it runs in a worker thread and takes its turn on the engine there."""
        return await asyncio.to_thread(self.query, question, top_k, blend, **sampling)

    async def aquery_batch(self, questions: Sequence[str], top_k: int | None = None, blend: bool = True,
                           **sampling: Any) -> list[QueryResult]:
        """`query_batch` in a worker thread."""
        return await asyncio.to_thread(self.query_batch, questions, top_k, blend, **sampling)

    async def aanswer(self, question: str, documents: Sequence[Any], blend: bool = True,
                      **sampling: Any) -> QueryResult:
        """`answer` in a worker thread."""
        return await asyncio.to_thread(self.answer, question, documents, blend, **sampling)

    def _chunk_of(self, position: int, doc: Any) -> tuple[tuple[int, ...], Source]:
        if isinstance(doc, Chunk):
            return doc.token_ids, Source(doc.chunk_id, doc.source, doc.title, doc.index)
        metadata = getattr(doc, "metadata", None)
        if not isinstance(metadata, dict) or not metadata.get("token_ids"):
            raise ValueError(f"document {position} carries no kvblend token_ids metadata; retrieve it with "
                             "KVBlendRetriever or CachedRetriever, or pass kvblend Chunks")
        ids = tuple(int(t) for t in metadata["token_ids"])
        if metadata.get("cache_key") not in (None, self.key_for(ids)):
            log.warning("document %d: its cache_key was made for another model, namespace or tenant; its KV will "
                        "not be found and it is prefilled instead", position)
        return ids, Source(str(metadata.get("chunk_id", "")), str(metadata.get("source", "")),
                           str(metadata.get("title", "")), int(metadata.get("index", -1)), metadata.get("score"))

    # -- LangChain and lifecycle --------------------------------------------------------------------------
    def as_retriever(self, k: int | None = None):
        """A LangChain KVBlendRetriever over this pipeline's index (feed its Documents to `answer`)."""
        from kvblend.retrieval import KVBlendRetriever

        with self._parts_lock:
            if self.index is None:
                self.index = open_index(self.config.index_dir)
        return KVBlendRetriever(index=self.index, embedder=self.embedder, key_for=self.key_for,
                                k=k or self.config.top_k)

    def close(self) -> None:
        """Shut the vLLM engine down (after the call on it, if any, ends) and flush this process's store view."""
        if self._stream_reader == threading.get_ident():
            raise RuntimeError("close the stream this thread is reading before the pipeline")
        with self._engine_lock:
            if self._llm is not None:
                stop_llm(self._llm)
                self._llm = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> RAGPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
