"""CPU TTFT of RAG prompts in vLLM: plain vLLM with prefix caching vs kvblend storage mode vs kvblend blend.

Prompts: the chat template + 6 chunks x 512 tokens (from the Python language reference) + a question. Every
chunk was seen before, in other positions: each engine first serves each chunk as its own request (kvblend:
stored through vLLM's extraction path) and RAG prompts holding the chunks in other orders. Then each mode
answers the same new prompts, one at a time (max_tokens=2 so the connector report is complete; TTFT is
unaffected): TTFT = the engine's first_token_ts - scheduled_ts
(prefill of the whole prompt including kvblend's work in the worker), median over the prompts.
The blend runs on vLLM's own modules (load format "kvblend"); a fourth row, kvblend_blend_torch_ops, moves the
chunks' K with kvblend's torch rope shift instead of vLLM's C++ rotary kernel. worker_memory: each engine's
worker RSS after its runs; blend minus plain minus the stored entries (the memory tier holds at most those) is
what blending costs in memory beyond the store.
Every engine's worker gets the same CPU cores (VLLM_CPU_NUM_OF_RESERVED_CPU=0, see main); cached_tokens per
prompt is vLLM's num_cached_tokens (its prefix cache plus the connector's matched tokens).
    python -m benchmarks.vllm_cpu rag_ttft [--tiny] [--prompts N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write  # noqa: E402

CHUNKS_PER_PROMPT, CHUNK_TOKENS = 6, 512


def ttft_ms(output) -> float:
    m = output.metrics
    return (m.first_token_ts - m.scheduled_ts) * 1e3


def build_prompts(tokenizer, n_prompts: int, seed: int):
    from kvblend.blend.prompt import chat_template
    from kvblend.model.tokenizer import encode
    from kvblend.rag.precompute import token_windows
    from kvblend.retrieval.corpus import pydoc_topics

    pool = []
    for doc in pydoc_topics():
        pool += [w for w in token_windows(encode(tokenizer, doc.text), CHUNK_TOKENS) if len(w) == CHUNK_TOKENS]
    rng = random.Random(seed)
    chunks = rng.sample(pool, 12)
    template = chat_template(tokenizer)
    sep = encode(tokenizer, "\n\n")
    questions = ["What does this say about exceptions?", "Summarize the statements described.",
                 "Which syntax is defined here?", "What happens at run time?", "Give an example from the text.",
                 "What are the rules for names?", "How is this evaluated?", "What is the main point?"]

    def prompt(parts, question):
        ids = list(template.prefix)
        spans = []
        for part in parts:
            spans.append((len(ids), len(part)))
            ids += part + sep
        return ids + list(template.question_prefix) + encode(tokenizer, question) + list(template.tail), spans

    history = [prompt(rng.sample(chunks, CHUNKS_PER_PROMPT), q)[0] for q in questions[:4]]
    tests = [prompt(rng.sample(chunks, CHUNKS_PER_PROMPT), questions[(i + 4) % len(questions)]) for i in range(n_prompts)]
    return chunks, history, tests


def run_engine(model_dir, dtype, connector, chunks, history, tests, modes):
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvblend.vllm.model_hook import LOAD_FORMAT

    kv = None
    if connector is not None:
        kv = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm.connector",
                              kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=connector)
    hook = {"load_format": LOAD_FORMAT} if connector is not None else {}  # the blend runs on vLLM's modules
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=4096, enforce_eager=True, max_num_seqs=4, seed=0,
              enable_prefix_caching=True, disable_log_stats=False, kv_transfer_config=kv, **hook)

    def params(extra):
        return SamplingParams(max_tokens=2, temperature=0.0,  # 2: the worker report arrives before the request ends
                              extra_args={"kv_transfer_params": {"kvblend": extra}} if extra is not None else None)

    store = {"store_prompt": True} if connector is not None else None
    plain = {"mode": "storage"} if connector is not None else None  # computed by vLLM, spans extracted
    llm.generate([{"prompt_token_ids": c} for c in chunks], params(store), use_tqdm=False)
    llm.generate([{"prompt_token_ids": h} for h in history], params(plain), use_tqdm=False)
    results = {}
    for mode, extra, salt in modes:
        times, reports, cached = [], [], []
        for i, (ids, spans) in enumerate(tests):
            request = dict(extra or {})
            if request.get("mode") == "blend":
                request["chunks"] = [list(s) for s in spans]
            inputs = {"prompt_token_ids": ids, **({"cache_salt": f"{salt}-{i}"} if salt else {})}
            out = llm.generate([inputs], params(request or None), use_tqdm=False)[0]
            times.append(ttft_ms(out))
            reports.append((out.kv_transfer_params or {}).get("kvblend") or {})
            cached.append(out.num_cached_tokens)  # vLLM's prefix cache hits plus the connector's matched tokens
        results[mode] = {"ttft_ms": times, "reports": reports, "cached_tokens": cached}
        print(f"{mode:22s} median TTFT {statistics.median(times):8.1f} ms  ({', '.join(f'{t:.0f}' for t in times)})",
              flush=True)
    results["worker_memory"] = worker_memory()
    llm.llm_engine.engine_core.shutdown()
    return results


def worker_memory() -> dict:
    """Resident memory of this engine's worker process (the deepest descendant of this process), from
    /proc/PID/smaps_rollup: total, anonymous and file-backed kB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pid, depth, frontier = os.getpid(), 0, [(os.getpid(), 0)]
    while frontier:
        node, d = frontier.pop()
        if d > depth:
            pid, depth = node, d
        frontier += [(c, d + 1) for c in children.get(node, [])]
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        rollup[name] = int(value.split()[0])
    return {"pid": pid, "rss_kb": rollup["Rss"], "anonymous_kb": rollup["Anonymous"],
            "file_kb": rollup["Rss"] - rollup["Anonymous"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(result_path("vllm_cpu_rag_ttft")))
    parser.add_argument("--dtype", default=None, help="engines' dtype (default: this CPU's, kvblend.cpu)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # vLLM's CPU worker keeps one core for the engine process, but a second one too (for NIXL) when any KV
    # connector is configured, and on a 2-core machine it then reserves none: a connector engine would compute
    # on 2 cores and plain vLLM on 1. Reserving none everywhere gives every engine the same cores.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from kvblend.cpu import cpu_compute_dtype
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.tokenizer import load_tokenizer

    dtype = args.dtype or cpu_compute_dtype()
    model_dir = embedded_model_dir()
    chunks, history, tests = build_prompts(load_tokenizer(model_dir), args.prompts, args.seed)
    started = time.time()
    plain = run_engine(model_dir, dtype, None, chunks, history, tests, [("vllm_prefix_caching", None, None)])
    with tempfile.TemporaryDirectory(prefix="kvblend-bench-") as store_dir:
        connector = {"mode": "blend", "store_dir": store_dir, "span_tokens": 256}
        # blend first: blended requests are never extracted, while storage-mode requests store their own spans,
        # which would hand a later blend of the same prompt an exact prefix
        kvblend = run_engine(model_dir, dtype, connector, chunks, history, tests,
                             [("kvblend_blend", {"mode": "blend", "ratio": 0.15}, "kvblend-blend"),
                              ("kvblend_storage", {"mode": "storage"}, None)])
        store_bytes = sum(f.stat().st_size for f in Path(store_dir).rglob("*") if f.is_file())
        # the same blend with kvblend's torch rope shift instead of vLLM's rotary kernel (a fresh engine and store)
        connector = {**connector, "store_dir": str(Path(store_dir) / "torch-ops"), "cpu_ops": "torch"}
        torch_ops = run_engine(model_dir, dtype, connector, chunks, history, tests,
                               [("kvblend_blend_torch_ops", {"mode": "blend", "ratio": 0.15}, "kvblend-blend")])
    memory = {"plain": plain.pop("worker_memory"), "blend": kvblend.pop("worker_memory"),
              "blend_torch_ops": torch_ops.pop("worker_memory")}
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    extra = memory["blend"]["rss_kb"] * 1024 - memory["plain"]["rss_kb"] * 1024 - store_bytes
    memory.update(weights_bytes=weights, store_entry_bytes=store_bytes, blend_minus_plain_minus_store_bytes=extra,
                  fraction_of_weights=round(extra / weights, 4))
    print(f"worker RSS: blend {memory['blend']['rss_kb'] / 1024:.0f} MB, plain {memory['plain']['rss_kb'] / 1024:.0f} MB"
          f", stored entries {store_bytes / 2**20:.0f} MB: blend - plain - store = {extra / 2**20:.1f} MB "
          f"({extra / weights:.1%} of the weights' {weights / 2**20:.0f} MB)", flush=True)
    results = {**plain, **kvblend, **torch_ops}
    base = statistics.median(results["vllm_prefix_caching"]["ttft_ms"])
    rows = []
    for mode, r in results.items():
        med = statistics.median(r["ttft_ms"])
        rows.append({"mode": mode, "ttft_ms_median": med, "ttft_ms": r["ttft_ms"], "speedup_vs_vllm": base / med,
                     "cached_tokens": r["cached_tokens"], "reports": r["reports"]})
    report = record("vllm_cpu_rag_ttft", rows, dtype=dtype,
                    env={k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU")},
                    prompt_tokens=[len(ids) for ids, _ in tests], seconds=round(time.time() - started, 1),
                    worker_memory=memory)
    write(args.json, report)
    print("\n| mode | median TTFT ms | vs vLLM prefix caching |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['ttft_ms_median']:.1f} | {row['speedup_vs_vllm']:.2f}x |")
    return 0


TINY = ["--prompts", "1", "--json", tiny_out("vllm_cpu_rag_ttft.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
