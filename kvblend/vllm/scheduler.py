"""Scheduler side of the connector: decide per request what the store can supply, and tell the worker.

Storage: the prompt is cut into prefix-chained spans of `span_tokens` (span i keyed by its tokens and the hash
of all tokens before it), so a stored span is exact wherever it is found; the run of stored spans from the
start, beyond what vLLM's prefix cache already holds, is loaded. Blend: cached chunks (the request's explicit
layout, or discovered by content hash) make the connector claim every prompt token but the last, and the
worker blends them. Prefills vLLM computes itself are extracted into the store. A request without kvblend
parameters is blended only if the deployment says so (ConnectorConfig.discover_blend); a store request
(store_prompt) is never blended nor loaded: vLLM computes it (its own prefix cache aside), and the connector
stores what vLLM computed, even when the prompt holds other stored chunks.

Under tensor parallelism each rank stores its own shard of a span's KV (`ChunkKey.for_shard`); a span or chunk is
in the store only if every rank's shard is, so a request is served from the store by all ranks or by none.

Every key of a request is made in its namespace (`RequestParams.key_namespace`): a request carrying a tenant
secret reads, discovers and writes only its tenant's namespace, so naming another tenant's namespace gets misses.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from kvblend.store.key import WHOLE, ChunkKey, prefix_chained_keys
from kvblend.store.tiered import TieredStore
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.metadata import STORE_FIELDS, BlendJob, KVBlendMetadata, KVBlendWorkerMeta, LoadJob, SaveJob, Span
from kvblend.vllm.metrics import KVBlendStats, take
from kvblend.vllm.params import KEY, RequestParams, locate_documents, parse_params
from kvblend.vllm.report import nothing_reused

log = logging.getLogger(__name__)
SELF_CHECK_TOKENS = 32
WORKER_KEYS_KEPT = 100_000  # by then the store's background writer has long made them visible to contains()


def prefix_spans(fingerprint: str, prompt: list[int], span_tokens: int, namespace: str) -> list[Span]:
    """Every full span of the prompt, keyed by its tokens and (as its context) all tokens before it."""
    keys = prefix_chained_keys(fingerprint, prompt, span_tokens, namespace)
    return [Span(i * span_tokens, span_tokens, key) for i, key in enumerate(keys)]


@dataclass
class _Extraction:
    job: SaveJob
    done_at: int


class SchedulerSide:
    def __init__(self, config: ConnectorConfig, fingerprint: str, store: TieredStore,
                 encode_text: Callable[[str], list[int]] | None = None, shards: tuple[str, ...] = (WHOLE,)) -> None:
        """`encode_text`: a document text's token ids as its chunk is keyed (for requests naming documents);
        `shards`: every tensor-parallel rank's shard of the KV (`tensor_parallel.all_shards`)."""
        self.config = config
        self.shards = shards
        self.encode_text = encode_text
        self.fingerprint = fingerprint
        self.store = store
        self.server_key = config.store_config().secret  # the deployment secret keys the tenants' namespaces
        self.blend_ready: bool | None = None if config.self_check else True
        self.check_report: dict | None = None  # the worker's self-check measurements, in every blend report
        self.blend_off_reason = ""
        self._check_sent = False
        self._params: dict[str, RequestParams] = {}
        self._matched: dict[str, LoadJob | BlendJob] = {}
        self._jobs = KVBlendMetadata()
        self._blended: set[str] = set()  # their KV is approximate: never extracted
        self._extracting: dict[str, _Extraction] = {}
        self._reports: dict[str, dict] = {}
        self._worker_keys: OrderedDict[str, None] = OrderedDict()  # recent worker puts, bounded
        self._finished: list[str] = []
        self.stats = KVBlendStats()  # matched requests and tokens, for vLLM's /metrics

    def _present(self, key: ChunkKey) -> bool:
        """Every rank's shard in the store, or just stored by its worker (its slow-tier writes may still be
        queued)."""
        return all(k.digest in self._worker_keys or self.store.contains(k) for k in map(key.for_shard, self.shards))

    def _stored_run(self, spans: list[Span]) -> list[Span]:
        """The leading spans that are in the store (a prefix run: one gap ends it)."""
        run = []
        for span in spans:
            if not self._present(span.key):
                break
            run.append(span)
        return run

    def matched_tokens(self, req_id: str, prompt: list[int], kv_transfer_params: dict | None, num_computed: int) -> int:
        """Tokens beyond `num_computed` the connector will supply for this request (0: none; a request that carried
        kvblend parameters is told why in its report)."""
        asked, why = KEY in (kv_transfer_params or {}), None
        try:
            params = parse_params(kv_transfer_params, len(prompt))
        except (ValueError, TypeError) as exc:
            log.warning("request %s: bad kvblend parameters (%s); running it as plain vLLM", req_id, exc)
            params, why = RequestParams(mode="off"), "bad_params"
        self._matched.pop(req_id, None)
        if self.config.require_tenant and params.tenant_secret is None and params.mode != "off":
            self._params[req_id] = RequestParams(mode="off")
            return self._nothing(req_id, True, "tenant_required")  # told even to a plain client
        self._params[req_id] = params
        mode = params.mode or self.config.request_mode(asked=asked)
        if mode == "off" and why is None:
            return 0  # the request asked kvblend to stay out of it (a plain comparison, the warm-up): no report
        if mode == "off" or len(prompt) < 2 or params.store_prompt:
            why = why or ("store_prompt" if params.store_prompt else "short_prompt")
            return self._nothing(req_id, asked, why)
        namespace = params.key_namespace(self.config.namespace, self.server_key)
        limit = len(prompt) - 1
        stored = [s for s in self._stored_run(prefix_spans(self.fingerprint, prompt, self.config.span_tokens, namespace))
                  if s.end <= limit]
        exact_end = max([num_computed] + [s.end for s in stored])
        wanted = [s for s in stored if s.end > num_computed]
        prefetch = self.config.prefetch if params.prefetch is None else params.prefetch
        if mode == "blend" and self.blend_ready is False:  # said in the request's report, never silently
            self._reports.setdefault(req_id, {})["blend_off"] = self.blend_off_reason
        if mode == "blend" and not self.blend_ready:
            why = "blend_off" if self.blend_ready is False else "blend_not_ready"
        if mode == "blend" and self.blend_ready:
            chunks, why = self._cached_chunks(req_id, prompt, params, namespace, exact_end)
            if chunks:
                config = self.config.blend_config(params.policy, params.ratio, params.gate_bound, params.gate_raise)
                self._matched[req_id] = BlendJob(req_id, prompt, [], num_computed, wanted, chunks, config, prefetch,
                                                 params.profile)
                return limit - num_computed
        if exact_end > num_computed:
            self._matched[req_id] = LoadJob(req_id, [], wanted, num_computed, prefetch)
            return exact_end - num_computed
        return self._nothing(req_id, asked, why or ("prefix_cached" if num_computed else "not_stored"))

    def _nothing(self, req_id: str, asked: bool, reason: str) -> int:
        """No tokens from the store; a request that carried kvblend parameters gets a report saying why (mode
        "none": neither blended nor loaded)."""
        if asked:
            nothing_reused(self._reports.setdefault(req_id, {}), reason).update(mode="none", matched_tokens=0)
        return 0

    def _cached_chunks(self, req_id: str, prompt: list[int], params: RequestParams, namespace: str,
                       exact_end: int) -> tuple[list[Span], str | None]:
        """Chunks of the prompt (explicit spans, named documents, or discovered) whose KV is stored in `namespace` and that lie
        past the exact prefix, before the last token (which vLLM computes); if none, the reason (report.REASONS)."""
        limit = len(prompt) - 1
        if params.chunks is not None:
            spans = list(params.chunks)
        elif params.documents is not None:
            spans = self._document_spans(req_id, prompt, params.documents)
        elif self.config.discover:
            spans = self.store.anchors.find(prompt[:limit], namespace, self.config.min_chunk_tokens)
        else:
            spans = []
        found = []
        for start, length in spans:
            if start + length > limit or start + length <= exact_end:
                continue
            key = ChunkKey.alone(self.fingerprint, prompt[start : start + length], namespace)
            if self._present(key):
                found.append(Span(start, length, key))
        return found, None if found else self._why_no_chunks(prompt, spans, params, exact_end)

    def _why_no_chunks(self, prompt: list[int], spans: list[tuple[int, int]], params: RequestParams,
                       exact_end: int) -> str:
        """Why none of the prompt's candidate chunk `spans` is blended (a code of report.REASONS)."""
        if not spans:
            return "not_found" if params.documents is None and params.chunks is None else "not_located"
        if all(start + length <= exact_end for start, length in spans):
            return "prefix_cached"
        if params.tenant_secret is not None:  # the shared namespace is readable without a secret: telling leaks nothing
            shared = replace(params, tenant_secret=None).key_namespace(self.config.namespace, self.server_key)
            if any(self._present(ChunkKey.alone(self.fingerprint, prompt[start : start + length], shared))
                   for start, length in spans):
                return "tenant"
        return "not_stored"

    def _document_spans(self, req_id: str, prompt: list[int], documents) -> list[tuple[int, int]]:
        """Spans of the named documents in the prompt; how many were found goes into the request's report."""
        if self.encode_text is None and any(isinstance(d, str) for d in documents):
            log.warning("request %s: documents given as text but this connector has no tokenizer", req_id)
            return []
        ids = [list(d) if isinstance(d, tuple) else self.encode_text(d) for d in documents]
        located = locate_documents(prompt, ids)
        spans = [s for s in located if s is not None]
        if len(spans) < len(documents):
            missing = [i for i, s in enumerate(located) if s is None]
            log.warning("request %s: documents %s do not occur in the prompt's token ids in the given order "
                        "(a text tokenized differently in context?); they are prefilled", req_id, missing)
        self._reports.setdefault(req_id, {}).update(documents=len(documents), documents_found=len(spans))
        return spans

    def after_alloc(self, req_id: str, block_ids: list[int], num_external: int) -> None:
        job = self._matched.pop(req_id, None)
        if job is None or num_external == 0:
            return
        job.block_ids = list(block_ids)
        for field in ("reason", "detail"):  # left by an earlier match of this request that found nothing
            self._reports.get(req_id, {}).pop(field, None)
        self.stats.add("requests", label="blend" if isinstance(job, BlendJob) else "storage")
        self.stats.add("matched_tokens", num_external)
        if isinstance(job, BlendJob):
            self._blended.add(req_id)
            self._jobs.blends.append(job)
            self._reports.setdefault(req_id, {}).update(
                mode="blend", chunks=len(job.chunks), chunk_tokens=sum(s.length for s in job.chunks),
                matched_tokens=num_external, self_check=self.check_report)
        else:
            self._jobs.loads.append(job)
            self._reports.setdefault(req_id, {}).update(mode="storage", spans=len(job.spans),
                                                        matched_tokens=num_external)

    def build_meta(self, scheduler_output) -> KVBlendMetadata:
        meta, self._jobs = self._jobs, KVBlendMetadata()
        so = scheduler_output
        meta.step_tokens = so.total_num_scheduled_tokens
        for req in so.scheduled_new_reqs:
            prompt = list(req.prompt_token_ids or [])
            block_ids = list(req.block_ids[0]) if req.block_ids else []
            done = req.num_computed_tokens + so.num_scheduled_tokens.get(req.req_id, 0)
            if req.req_id not in self._blended:  # exact KV (loaded spans included): its new spans are stored
                self._plan_extraction(req.req_id, prompt, block_ids, req.num_computed_tokens)
                if self._wants_check(req.num_computed_tokens, done, len(prompt)):
                    n = min(len(prompt), 256)
                    meta.check = SaveJob(req.req_id, prompt[:n], block_ids, [])
                    self._check_sent = True
            self._advance(req.req_id, done, meta)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            extraction = self._extracting.get(req_id)
            if extraction is not None and cached.new_block_ids[i]:
                extraction.job.block_ids.extend(cached.new_block_ids[i][0])
            self._advance(req_id, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0), meta)
        return meta

    def _wants_check(self, num_computed: int, done: int, prompt_len: int) -> bool:
        return (self.blend_ready is None and not self._check_sent and num_computed == 0
                and done >= min(prompt_len, 256) and prompt_len >= SELF_CHECK_TOKENS)

    def _plan_extraction(self, req_id: str, prompt: list[int], block_ids: list[int], num_computed: int) -> None:
        """Spans of a prompt vLLM computes itself that the store lacks: the prompt as one chunk if asked,
        else (extract on) its prefix-chained spans beyond vLLM's own cache hit."""
        params = self._params.get(req_id, RequestParams())
        if params.mode == "off" or not prompt:
            return
        namespace = params.key_namespace(self.config.namespace, self.server_key)
        if params.store_prompt:
            spans = [Span(0, len(prompt), ChunkKey.alone(self.fingerprint, prompt, namespace))]
        elif self.config.extract:
            spans = prefix_spans(self.fingerprint, prompt, self.config.span_tokens, namespace)
        else:
            spans = []
        spans = [s for s in spans if not self._present(s.key)]
        if spans:
            self._extracting[req_id] = _Extraction(SaveJob(req_id, prompt, block_ids, spans),
                                                   done_at=max(s.end for s in spans))

    def _advance(self, req_id: str, computed: int, meta: KVBlendMetadata) -> None:
        extraction = self._extracting.get(req_id)
        if extraction is not None and computed >= extraction.done_at:
            meta.saves.append(self._extracting.pop(req_id).job)

    def on_worker_meta(self, worker_meta: KVBlendWorkerMeta | None) -> None:
        if worker_meta is None:
            return
        if worker_meta.blend_ready is not None and worker_meta.blend_ready != self.blend_ready:
            self.blend_ready = worker_meta.blend_ready
            self.check_report = worker_meta.check_report
            self.blend_off_reason = "" if self.blend_ready else worker_meta.reason
            if not self.blend_ready:
                log.warning("kvblend: blending disabled, requests run as plain vLLM: %s", worker_meta.reason)
        late = set(self._finished)
        self._finished.clear()
        for req_id, report in worker_meta.reports.items():
            # storing alone joins a report, never starts one: a request without the kvblend key gets a report
            # only when the connector supplied something
            if req_id not in late and (req_id in self._reports or not report.keys() <= STORE_FIELDS):
                self._reports.setdefault(req_id, {}).update(report)
        for key, token_ids in worker_meta.stored:
            self._worker_keys[key.digest] = None
            if len(self._worker_keys) > WORKER_KEYS_KEPT:
                self._worker_keys.popitem(last=False)
            if token_ids is not None:
                self.store.anchors.remember(token_ids, key.namespace)

    def take_stats(self) -> KVBlendStats | None:
        """What this side counted since the last call (None: nothing)."""
        return take(self.stats)

    def finished(self, req_id: str) -> dict | None:
        """Forget the request; its report becomes RequestOutput.kv_transfer_params["kvblend"]. vLLM frees a
        request that ends at its first token before it hands over that step's worker output, so such a request
        reports only what the scheduler knows (mode, chunks, matched tokens); the worker's part arrives later
        and is dropped."""
        self._params.pop(req_id, None)
        self._matched.pop(req_id, None)
        self._extracting.pop(req_id, None)
        self._blended.discard(req_id)
        self._finished.append(req_id)
        report = self._reports.pop(req_id, None)
        if report and (report.get("gate") or {}).get("decision") == "full_prefill":
            nothing_reused(report, "gate")
        elif report and (report.get("controller") or {}).get("recompute"):
            nothing_reused(report, "controller")
        elif report and ("blend_error" in report or "load_error" in report):
            nothing_reused(report, "error")
        return {"kvblend": report} if report else None
