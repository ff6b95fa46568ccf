"""What prefetch saves inside vLLM: TTFT of blended RAG prompts whose chunks live only on disk (page cache
dropped) or only in Redis, with the connector's prefetch off or on (request parameter `prefetch`, mode
"scheduling"), and (disk) also at retrieval (what RAGPipeline does: page-cache readahead from the retrieving
process, then the connector's).

    python -m benchmarks.vllm_cpu prefetch [--tiny] [--requests 4] [--json OUT]

Chunks: 512-token windows of the Python language reference, their KV precomputed offline by kvblend's torch
runner in the engines' dtype (--dtype, default this CPU's compute dtype, kvblend.cpu) into a disk directory and a
private redis-server. Two engines, one after the other: a disk-only store and a Redis-only store (a fresh memory
tier each). Every request holds 4 chunks no earlier
request used (so the memory tier never already holds them), a different question, explicit chunk layout,
max_tokens=2. TTFT = first_token_ts - queued_ts (from the engine taking the request in: the scheduler-side
prefetch starts inside that window). Median per mode; modes alternate request by request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write  # noqa: E402

CHUNKS_PER_PROMPT, CHUNK_TOKENS = 4, 512
QUESTIONS = ["What does this say about exceptions?", "Summarize the statements described.", "Which syntax is defined?",
             "What happens at run time?", "Give an example from the text.", "What are the rules for names?",
             "How is this evaluated?", "What is the main point?"]


def ttft_ms(output) -> float:
    m = output.metrics
    return (m.first_token_ts - m.queued_ts) * 1e3


def drop_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_engine(model_dir, dtype: str, connector: dict, requests, modes, disk_dir: str | None, warmup) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvblend.store import StoreConfig, open_store
    from kvblend.vllm.model_hook import LOAD_FORMAT

    kv = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm.connector",
                          kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=connector)
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=4096, enforce_eager=True, max_num_seqs=4, seed=0,
              enable_prefix_caching=True, disable_log_stats=False, kv_transfer_config=kv, load_format=LOAD_FORMAT)
    warm_view = open_store(StoreConfig(disk_dir=disk_dir)) if disk_dir else None  # the pipeline's own store view

    def params(extra):
        return SamplingParams(max_tokens=2, temperature=0.0, extra_args={"kv_transfer_params": {"kvblend": extra}})

    plain, (blend_ids, blend_spans, _) = warmup
    llm.generate([{"prompt_token_ids": plain}], params({"mode": "off"}), use_tqdm=False)  # the worker's self-check
    llm.generate([{"prompt_token_ids": blend_ids, "cache_salt": "warmup"}],
                 params({"mode": "blend", "chunks": [list(s) for s in blend_spans]}), use_tqdm=False)
    results = {mode: {"ttft_ms": [], "reports": []} for mode in modes}
    for i, (ids, spans, keys) in enumerate(requests):
        mode = modes[i % len(modes)]
        if disk_dir:
            drop_page_cache([Path(disk_dir) / k.digest[:2] / (k.digest + ".kv.safetensors") for k in keys])
        if mode == "retrieval":
            warm_view.warm(keys)
        request = {"mode": "blend", "chunks": [list(s) for s in spans], "prefetch": mode != "off"}
        out = llm.generate([{"prompt_token_ids": ids, "cache_salt": f"prefetch-{i}"}], params(request),
                           use_tqdm=False)[0]
        results[mode]["ttft_ms"].append(ttft_ms(out))
        results[mode]["reports"].append((out.kv_transfer_params or {}).get("kvblend") or {})
    if warm_view is not None:
        warm_view.close()
    llm.llm_engine.engine_core.shutdown()
    for mode, r in results.items():
        print(f"{connector.get('redis_url') and 'redis' or 'disk':5s} {mode:10s} median TTFT "
              f"{statistics.median(r['ttft_ms']):8.1f} ms ({', '.join(f'{t:.0f}' for t in r['ttft_ms'])})", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4, help="requests per mode and store")
    parser.add_argument("--json", default=str(result_path("vllm_cpu_prefetch")))
    parser.add_argument("--dtype", default=None, help="engines' and precompute's dtype (default: this CPU's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from redis_server import RedisServer

    from kvblend.blend.prompt import chat_template
    from kvblend.cpu import cpu_compute_dtype
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import encode, load_tokenizer
    from kvblend.rag.precompute import chunk_key, compute_chunk_kv, token_windows
    from kvblend.retrieval.corpus import pydoc_topics
    from kvblend.store import DiskTier, RedisConfig, RedisTier

    started = time.time()
    dtype = args.dtype or cpu_compute_dtype()
    model_dir = embedded_model_dir()
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(tokenizer)
    sep = encode(tokenizer, "\n\n")
    pool = []
    for doc in pydoc_topics():
        pool += [w for w in token_windows(encode(tokenizer, doc.text), CHUNK_TOKENS)[1:] if len(w) == CHUNK_TOKENS]
    disk_modes, redis_modes = ["off", "scheduling", "retrieval"], ["off", "scheduling"]
    n_requests = args.requests * (len(disk_modes) + 1)  # disk requests, then + 1 set for the warm-up blend
    needed = CHUNKS_PER_PROMPT * n_requests
    if len(pool) < needed:
        raise SystemExit(f"only {len(pool)} chunks in the corpus, {needed} needed")
    pool = pool[:needed]

    def prompt(parts, question):
        ids, spans = list(template.prefix), []
        for part in parts:
            spans.append((len(ids), len(part)))
            ids += list(part) + sep
        return ids + list(template.question_prefix) + encode(tokenizer, question) + list(template.tail), spans

    model = LlamaModel.from_dir(model_dir, dtype=dtype)
    requests = []
    for r in range(n_requests):
        parts = pool[r * CHUNKS_PER_PROMPT : (r + 1) * CHUNKS_PER_PROMPT]
        ids, spans = prompt(parts, QUESTIONS[r % len(QUESTIONS)])
        requests.append((ids, spans, [chunk_key(model, p) for p in parts]))
    warmup_blend, requests = requests[-1], requests[:-1]
    plain_warmup = list(template.prefix) + [t for p in pool[:1] for t in p] + list(template.tail)

    server = RedisServer().start()
    with tempfile.TemporaryDirectory(prefix="kvblend-prefetch-") as disk_dir:
        disk = DiskTier(disk_dir, 1 << 36)
        redis = RedisTier(RedisConfig(server.url, timeout_s=60.0))
        for part in pool:
            key = chunk_key(model, part)
            kv = compute_chunk_kv(model, key, part)
            assert disk.put(key, kv) and redis.put(key, kv)
        del model
        print(f"precomputed {len(pool)} chunks in {time.time() - started:.0f} s", flush=True)
        load_before = os.getloadavg()
        on_disk = run_engine(model_dir, dtype, {"mode": "blend", "store_dir": disk_dir, "extract": False}, requests,
                             disk_modes, disk_dir, (plain_warmup, warmup_blend))
        in_redis = run_engine(model_dir, dtype,
                              {"mode": "blend", "disk": False, "redis_url": server.url, "extract": False},
                              requests[: args.requests * len(redis_modes)], redis_modes, None,
                              (plain_warmup, warmup_blend))
        load_after = os.getloadavg()
    server.close()
    rows = [{"store": store, "prefetch": mode, "ttft_ms_median": statistics.median(r["ttft_ms"]), **r}
            for store, results in (("disk (page cache dropped)", on_disk), ("redis (loopback)", in_redis))
            for mode, r in results.items()]
    report = record("vllm_cpu_prefetch", rows, dtype=dtype,
                    env={k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU")},
                    load_avg_before=load_before, load_avg_after=load_after, seconds=round(time.time() - started, 1))
    write(args.json, report)
    print("\n| store | prefetch | median TTFT ms | TTFTs ms |\n|---|---|---:|---|")
    for row in rows:
        print(f"| {row['store']} | {row['prefetch']} | {row['ttft_ms_median']:.1f} | "
              f"{', '.join(f'{t:.0f}' for t in row['ttft_ms'])} |")
    return 0


TINY = ["--requests", "1", "--json", tiny_out("vllm_cpu_prefetch.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
