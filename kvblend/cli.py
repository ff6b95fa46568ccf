"""The `kvblend` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input.

Options default to None ("not given"): only what the user sets is passed on, and every other setting takes
its one owner's default (StoreConfig, BlendConfig, PipelineConfig, ChunkerConfig, PrecomputeConfig).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kvblend.blend.config import DEFAULT_POLICY, DEFAULT_RATIO
from kvblend.store.entry import CODECS

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
STATS_SOURCES = 20


def given(args: argparse.Namespace, **options: str) -> dict:
    """{keyword: value} for each keyword=option the user set (None: not given, so the owner's default applies)."""
    return {keyword: getattr(args, option) for keyword, option in options.items() if getattr(args, option) is not None}


def add_dtype_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help=f"{what} (default: this CPU's compute dtype, bfloat16 only with native bf16 such as "
                        "avx512_bf16 or AMX, else float32; stored chunk KV is keyed by it)")


def engine_dtype(args: argparse.Namespace) -> str:
    """--dtype if given, else the serving engine's default (DEFAULT_ENGINE_ARGS: this CPU's compute dtype)."""
    from kvblend.rag.config import DEFAULT_ENGINE_ARGS

    return args.dtype or DEFAULT_ENGINE_ARGS["dtype"]


def dtype_settings(args: argparse.Namespace) -> dict:
    """PipelineConfig settings for --dtype: engine_args that set it when given, nothing otherwise."""
    return {"engine_args": {"dtype": args.dtype}} if args.dtype is not None else {}


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None, help="disk tier directory (default: ~/.cache/kvblend/store)")
    p.add_argument("--disk-gb", type=float, default=None, help="disk tier budget in GiB (default 20)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory tier budget in GiB (default 2)")
    p.add_argument("--redis", default=os.environ.get("KVBLEND_REDIS_URL"), help="Redis tier URL, redis://host:port/db or redis+cluster://host:port,host:port")
    p.add_argument("--redis-gb", type=float, default=None,
                   help="Redis tier budget in GiB, LRU-evicted (default 20; keep it below the server's maxmemory)")
    p.add_argument("--redis-ttl-s", type=int, default=None, help="expire Redis entries unused this long (default: never)")


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    add_store_args(p)
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: embedded SmolLM2)")
    p.add_argument("--namespace", default=None, help="chunk store namespace (default: default; with "
                   "KVBLEND_TENANT_SECRET set, the tenant's own namespace of that name)")
    p.add_argument("--policy", default=None, help=f"blend policy (default {DEFAULT_POLICY})")
    p.add_argument("--ratio", type=float, default=None, help=f"recompute ratio (default {DEFAULT_RATIO:g})")
    add_dtype_arg(p, "the vLLM engine's dtype")


def check_store_dir(path: Path) -> None:
    """Raise ValueError naming `path` and the problem unless a store can live there: a directory, or one that can be
    created (main checks every command's store before the command starts, so none fails half-way with a traceback)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        problem = "is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is on a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "is not writable"
    else:
        return
    raise ValueError(f"cannot use {path} as the store directory: {existing} {problem}")


def open_cli_store(args: argparse.Namespace):
    from kvblend.store import StoreConfig, open_store

    return open_store(StoreConfig.from_settings(**given(args, store_dir="store", memory_gb="memory_gb",
                                                        disk_gb="disk_gb", redis_url="redis", redis_gb="redis_gb",
                                                        redis_ttl_s="redis_ttl_s")))


def cmd_precompute(args: argparse.Namespace) -> int:
    from kvblend.retrieval.corpus import pydoc_topics, read_corpus

    if not args.paths and not args.pydoc_topics:
        print("kvblend precompute: give PATH... or --pydoc-topics", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.index is not None and args.max_chunks is not None:
        print("kvblend precompute: --max-chunks applies only without --index", file=sys.stderr)
        return EXIT_BAD_INPUT
    docs = (pydoc_topics() if args.pydoc_topics else []) + read_corpus(args.paths)
    if args.redis:
        from kvblend.rag.config import require_redis

        require_redis(args.redis)
    if args.index is not None:
        return precompute_indexed(args, docs)
    return precompute_windows(args, docs)


def precompute_windows(args: argparse.Namespace, docs) -> int:
    """Without an index: every document's chunks (the chunker's, cut lazily), KV stored only."""
    from kvblend.model.embedded import resolve_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.rag.precompute import PrecomputeConfig, text_chunks

    config = PrecomputeConfig(**given(args, chunk_tokens="chunk_tokens", namespace="namespace", max_chunks="max_chunks"))
    model_dir = resolve_model_dir(args.model)
    model = LlamaModel.from_dir(model_dir, dtype=engine_dtype(args))
    chunks = text_chunks(load_tokenizer(model_dir), docs, config)
    with open_cli_store(args) as store:
        report = run_with_progress(model, store, chunks, config.namespace)
        print(f"{report.stored} chunks computed and stored, {report.cached} already cached "
              f"({sum(r.num_tokens for r in report.records)} tokens, model {model.spec.fingerprint[:12]}, "
              f"{model.spec.dtype})")
    return lost_chunks(report)


def lost_chunks(report) -> int:
    """EXIT_FAILURE, said on stderr, when the store does not hold chunks the run computed."""
    if not report.lost:
        return EXIT_OK
    print(f"kvblend precompute: {report.lost} computed chunks are not in the store afterwards (a tier refused or "
          "failed the write; see the log); run again to retry them", file=sys.stderr)
    return EXIT_FAILURE


def precompute_indexed(args: argparse.Namespace, docs) -> int:
    """With --index: the RAGPipeline's chunks (stable boundaries), embedded into the index, KV stored by the
    torch runner in the dtype vLLM serves (engine_dtype), so RAGPipeline and `kvblend query` reuse it."""
    from tqdm import tqdm

    from kvblend.model.embedded import resolve_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.rag.index_updates import index_exists, update_index
    from kvblend.retrieval import ChunkerConfig, Embedder, VectorIndex

    chunker = ChunkerConfig(**given(args, chunk_tokens="chunk_tokens"))
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    embedder = Embedder()
    index = (VectorIndex.open(args.index) if index_exists(args.index)
             else VectorIndex.create(args.index, embedder.dim, embedder.name))
    with tqdm(total=len(docs), unit="doc", desc="index", file=sys.stderr) as bar:
        added, chunks = update_index(index, embedder, tokenizer, docs, chunker,
                                     on_document=lambda doc, n: bar.update(1))
    model = LlamaModel.from_dir(model_dir, dtype=engine_dtype(args))
    with open_cli_store(args) as store:
        report = run_with_progress(model, store, [(c.source, c.index, c.token_ids) for c in chunks], args.namespace)
    print(f"index {args.index}: {len(docs)} documents, {added} chunks added, {len(index)} chunks in all")
    print(f"store: {report.stored} chunks computed and stored, {report.cached} already cached "
          f"(model {model.spec.fingerprint[:12]}, {model.spec.dtype})")
    return lost_chunks(report)


def run_with_progress(model, store, chunks, namespace: str | None = None):
    """Precompute into `namespace` (None: the default), in the tenant's own namespace when KVBLEND_TENANT_SECRET
    is set, as RAGPipeline and `kvblend query` do."""
    from tqdm import tqdm

    from kvblend.rag.precompute import precompute_chunks
    from kvblend.store import StoreConfig
    from kvblend.store.key import DEFAULT_NAMESPACE, TENANT_SECRET_ENV, key_namespace

    where = key_namespace(namespace or DEFAULT_NAMESPACE, os.environ.get(TENANT_SECRET_ENV), StoreConfig().secret)
    total = len(chunks) if isinstance(chunks, list) else None
    with tqdm(total=total, unit="chunk", desc="precompute", file=sys.stderr) as bar:
        def tick(record):
            bar.update(1)
            bar.set_postfix(computed=record.computed)

        return precompute_chunks(model, store, chunks, where, on_chunk=tick)


def cmd_stats(args: argparse.Namespace) -> int:
    from kvblend.rag.config import default_index_dir
    from kvblend.rag.index_updates import index_exists, open_index

    if args.redis:
        from kvblend.rag.config import require_redis

        require_redis(args.redis)
    index_dir = args.index or default_index_dir()
    if args.index is not None or index_exists(index_dir):
        index = open_index(index_dir)
        sources = index.sources()
        print(f"index    {index_dir}: chunks={len(index)} sources={len(sources)} embedder={index.embedder_name}")
        for source in sources[:STATS_SOURCES]:
            print(f"         {source}")
        if len(sources) > STATS_SOURCES:
            print(f"         ... and {len(sources) - STATS_SOURCES} more")
    else:
        print(f"index    none at {index_dir}")
    with open_cli_store(args) as store:
        totals = store.totals()
        for tier in store.tiers:
            s = totals[tier.name]
            held = "(per process)" if tier.name == "memory" else f"entries={s.entries} bytes={s.bytes}"
            print(f"{tier.name:8s} {held} budget={tier.max_bytes} hits={s.hits} misses={s.misses} "
                  f"evictions={s.evictions} puts={s.puts} corrupt={s.corrupt} errors={s.errors}")
            if tier.name == "redis":
                limits = tier.server_limits()
                print(f"         server maxmemory={limits.get('maxmemory')} policy={limits.get('maxmemory_policy')} "
                      f"used_memory={limits.get('used_memory')}")
    return EXIT_OK


def pipeline_from_args(args: argparse.Namespace, **settings):
    """A RAGPipeline on the command line's model, index, store and blend settings and `settings` (its engine
    starts later); the index must exist."""
    from kvblend.rag.index_updates import open_index
    from kvblend.rag.pipeline import RAGPipeline

    rag = RAGPipeline(**given(args, model_dir="model", index_dir="index", store_dir="store", redis_url="redis",
                              redis_gb="redis_gb", redis_ttl_s="redis_ttl_s", memory_gb="memory_gb",
                              disk_gb="disk_gb", namespace="namespace", policy="policy",
                              ratio="ratio", top_k="top_k"), **dtype_settings(args), **settings)
    if rag.index is None:
        rag.close()
        open_index(rag.config.index_dir)  # raises, saying how to build one
    return rag


def cmd_query(args: argparse.Namespace) -> int:
    import json

    if not args.question.strip():
        print("kvblend query: the question is empty", file=sys.stderr)
        return EXIT_BAD_INPUT
    with pipeline_from_args(args, **given(args, max_tokens="max_tokens")) as rag:
        result = rag.query(args.question, blend=not args.no_blend)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return EXIT_OK
    s = result.stats
    print(result.answer.strip())
    print("\nsources:")
    for i, src in enumerate(result.sources, 1):
        score = f" score {src.score:.3f}" if src.score is not None else ""
        print(f"  [{i}] {src.source} #{src.index}{score}")
    ttft = f"{s.ttft_ms:.1f} ms" if s.ttft_ms is not None else "n/a"
    print(f"\nTTFT {ttft}, prompt {s.prompt_tokens} tokens, mode {s.mode}: {s.chunks} chunks, "
          f"{s.tokens_reused} tokens reused, {s.tokens_recomputed} recomputed")
    if s.error:
        print(f"blend failed, vLLM recomputed the prompt: {s.error}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from kvblend.eval.bench import BENCH_MAX_TOKENS, default_questions, format_rows, run_bench

    if args.n <= 0:
        raise ValueError(f"-n must be positive, got {args.n}")
    if args.questions is not None:
        questions = [q.strip() for q in args.questions.read_text(encoding="utf-8").splitlines() if q.strip()]
        if not questions:
            raise ValueError(f"{args.questions} holds no questions (one per line)")
    max_tokens = BENCH_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    with pipeline_from_args(args, max_tokens=max_tokens) as rag:
        if args.questions is None:
            questions = default_questions(rag.index, args.n)
        rows = run_bench(rag, questions[: args.n], max_tokens=max_tokens)
    print(format_rows(rows))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import json

    from kvblend.model.embedded import resolve_model_dir
    from kvblend.rag.config import DEFAULT_SAMPLING, PipelineConfig, require_redis
    from kvblend.rag.engine import engine_env
    from kvblend.server import plain_vllm_command, serve, server_args

    sampling = dict(DEFAULT_SAMPLING)
    if args.sampling is not None:
        extra = json.loads(args.sampling)
        if not isinstance(extra, dict):
            raise ValueError(f"--sampling must be a JSON object of sampling fields, got {args.sampling!r}")
        sampling.update(extra)
    config = PipelineConfig(sampling=sampling, **given(args, model_dir="model", store_dir="store", redis_url="redis",
                                                       memory_gb="memory_gb", disk_gb="disk_gb",
                                                       namespace="namespace", policy="policy", ratio="ratio"),
                            **dtype_settings(args))
    if config.redis_url:
        require_redis(config.redis_url)
    vllm_args = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    model_dir = resolve_model_dir(config.model_dir, convert=not args.print_command)
    flags = server_args(model_dir, config, vllm_args=vllm_args, disagg=args.disagg, discover_blend=args.discover_blend,
                        **given(args, host="host", port="port"))
    if args.print_command:
        print(plain_vllm_command(flags, engine_env(config)))
        if not (model_dir / "config.json").is_file():
            print(f"kvblend serve: the embedded model is not converted yet; `kvblend model-dir` converts it to "
                  f"{model_dir} (once, about a minute)", file=sys.stderr)
        return EXIT_OK
    serve(model_dir, config, flags)
    return EXIT_OK


def cmd_model_dir(args: argparse.Namespace) -> int:
    from kvblend.model.embedded import resolve_model_dir
    from kvblend.model.spec import load_spec

    path = resolve_model_dir(args.model)
    spec = load_spec(path)
    print(path)
    print(f"{spec.architecture}: {spec.num_layers} layers, {spec.num_heads} heads, {spec.num_kv_heads} KV heads, "
          f"head_dim {spec.head_dim}, rope theta {spec.rope.theta:g} ({spec.rope.scaling_type}), {spec.dtype}, "
          f"fingerprint {spec.fingerprint}")
    return EXIT_OK


def cmd_eval_fidelity(args: argparse.Namespace) -> int:
    import json
    import subprocess

    import torch
    from tqdm import tqdm

    from kvblend.blend.prompt import chat_template
    from kvblend.blend.gate import DEFAULT_GATE_BOUND
    from kvblend.eval.fidelity import RATIOS, evaluate, gap_closed, make_cases, plot, read_questions, standard_settings
    from kvblend.eval.tasks import planted_cases, task_templates
    from kvblend.model.embedded import resolve_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.retrieval.corpus import pydoc_topics, read_corpus
    from kvblend.store.key import ALONE, BEHIND_PREFIX

    lo, _, hi = args.chunks.partition("-")
    chunks_per_case = (int(lo), int(hi or lo))
    if not 1 <= chunks_per_case[0] <= chunks_per_case[1]:
        raise ValueError(f"--chunks must be N or LO-HI with 1 <= LO <= HI, got {args.chunks!r}")
    if args.cases <= 0:
        raise ValueError("--cases must be positive")
    docs = pydoc_topics() if str(args.corpus) == "pydoc" else read_corpus([args.corpus])
    questions = read_questions(args.questions) if args.questions else []
    model_dir = resolve_model_dir(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LlamaModel.from_dir(model_dir, dtype=args.dtype)
    tokenizer = load_tokenizer(model_dir)
    cases = make_cases(tokenizer, docs, questions, args.cases, args.chunk_tokens, chunks_per_case, seed=args.seed)
    if args.task == "facts":
        if questions:
            raise ValueError("--task facts asks its own questions: leave out --questions")
        cases, _ = planted_cases(tokenizer, cases, task_templates(args.templates), seed=args.seed)
    contexts = (ALONE, BEHIND_PREFIX) if args.context == "both" else (args.context,)
    ratios = tuple(float(r) for r in args.ratios.split(",")) if args.ratios else RATIOS
    bounds = () if args.gate_bounds == "off" else tuple(float(b) for b in args.gate_bounds.split(",")) \
        if args.gate_bounds else (DEFAULT_GATE_BOUND,)
    gated = tuple(float(r) for r in args.gate_ratios.split(",")) if args.gate_ratios else (DEFAULT_RATIO,)
    settings = standard_settings(args.chunk_tokens, ratios, bounds, gated, baselines=not args.no_baselines,
                                 gate_raise=args.gate_raise)
    with tqdm(total=len(cases), unit="case", desc="fidelity", file=sys.stderr) as bar:
        rows = evaluate(model, tokenizer, chat_template(tokenizer), cases, settings, contexts, args.greedy_steps,
                        progress=lambda: bar.update(1), codec=args.codec)
    for row in rows:
        row["gap_closed"] = gap_closed(rows, row)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False).stdout.strip()
    report = {
        "model": str(model_dir.name),
        "fingerprint": model.spec.fingerprint,
        "dtype": model.spec.dtype,
        "corpus": str(args.corpus),
        "cases": len(cases),
        "chunk_tokens": args.chunk_tokens,
        "chunks_per_case": list(chunks_per_case),
        "greedy_steps": args.greedy_steps,
        "task": args.task,
        "codec": args.codec,
        "git_sha": sha or None,
        "command": "kvblend " + " ".join(sys.argv[1:]),
        "settings": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(rows, args.plot, f"{model_dir.name}: {len(cases)} cases, {args.dtype}")
    print(f"{'context':14s} {'policy':20s} {'ratio':>5s} {'kl_mean':>8s} {'kl_p90':>8s} {'top1':>6s} "
          f"{'greedy':>6s} {'match_len':>9s} {'gap':>6s} {'compute':>7s} {'task_em':>7s} {'task_f1':>7s} {'gate':>9s}")
    for r in rows:
        task = f"{r['task_em']:7.3f} {r['task_f1']:7.3f}" if "task_em" in r else f"{'':7s} {'':7s}"
        gate = f"{r['gate_raised']:.2f}/{r['gate_full_prefill']:.2f}" if "gate_raised" in r else ""
        name = f"{r['policy']} {r.get('variant', '')}".strip()
        print(f"{r['context']:14s} {name:20s} {r['ratio']:5.2f} {r['kl_mean']:8.4f} {r['kl_p90']:8.4f} "
              f"{r['top1']:6.3f} {r['greedy32_match']:6.3f} {r['greedy_match_len']:9.2f} {r['gap_closed']:6.2f} "
              f"{r['compute_fraction']:7.3f} {task} {gate:>9s}")
    if any("gate_raised" in r for r in rows):
        print("gate: share of requests whose ratio it raised / that it sent to full prefill")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvblend", description="CacheBlend-style KV reuse for RAG in vLLM")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("precompute", help="index documents (with --index) and store every chunk's KV cache",
                       description="Compute and store the KV cache of every chunk of some texts with the torch "
                                   "runner. With --index, chunk them as RAGPipeline does, embed them into that "
                                   "index and precompute the KV `kvblend query` reuses; without, cut the same "
                                   "chunks and only store their KV. Resumable: indexed documents and stored "
                                   "chunks are skipped.")
    p.add_argument("paths", nargs="*", type=Path, help=".txt/.md files or directories of them")
    p.add_argument("--pydoc-topics", action="store_true", help="add the stdlib's language reference topics")
    p.add_argument("--index", type=Path, default=None, help="vector index directory to create or update")
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: embedded SmolLM2)")
    add_dtype_arg(p, "the torch runner's dtype, which must be the serving engine's")
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: 512 with --index, else 256")
    p.add_argument("--namespace", default=None, help="chunk store namespace (default: default; with "
                   "KVBLEND_TENANT_SECRET set, the tenant's own namespace of that name)")
    p.add_argument("--max-chunks", type=int, default=None, help="stop after N chunks (without --index)")
    add_store_args(p)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("query", help="answer a question from an index, blending the chunks' cached KV in vLLM")
    p.add_argument("question")
    p.add_argument("--index", type=Path, default=None, help="index directory (default: ~/.cache/kvblend/index)")
    p.add_argument("--no-blend", action="store_true", help="plain vLLM prefill, for comparison")
    p.add_argument("--top-k", type=int, default=None, help="chunks to retrieve (default 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (default 128)")
    p.add_argument("--json", action="store_true", help="print the answer, sources and stats as JSON")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("stats", help="index size and sources; per tier: entries, bytes, budget, and hits, misses "
                                     "and evictions summed over every process that used the store")
    p.add_argument("--index", type=Path, default=None, help="index directory (default: ~/.cache/kvblend/index)")
    add_store_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("bench", help="TTFT of plain vLLM vs kvblend blending on questions over an index")
    p.add_argument("--index", type=Path, default=None, help="index directory (default: ~/.cache/kvblend/index)")
    p.add_argument("--questions", type=Path, default=None,
                   help="text file, one question per line (default: one question per indexed document title)")
    p.add_argument("-n", type=int, default=5, help="number of questions (default 5)")
    p.add_argument("--top-k", type=int, default=None, help="chunks to retrieve (default 4)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate per request (default 2: a request that ends at its first token "
                        "finishes before the connector's blend report reaches it)")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="evaluations")
    ev = p.add_subparsers(dest="evaluation", required=True)
    p = ev.add_parser("fidelity", help="blend vs full prefill: KL, top-1, greedy agreement (and task "
                                         "accuracy with --task facts) per policy and ratio, gated and fixed")
    p.add_argument("--corpus", type=Path, required=True,
                   help="directory of .txt/.md files, or 'pydoc' for the stdlib topics")
    p.add_argument("--questions", type=Path, default=None, help='JSONL, one {"question": "..."} per line')
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: embedded SmolLM2)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--chunks", default="4-6", help="chunks per case, N or LO-HI (default 4-6)")
    p.add_argument("--context", choices=["alone", "behind_prefix", "both"], default="alone",
                   help="how chunk KV is computed: alone from position 0, or behind the prompt prefix")
    p.add_argument("--greedy-steps", type=int, default=32)
    p.add_argument("--task", choices=["none", "facts"], default="none",
                   help="facts: plant a fact into one chunk per case and ask about it; adds task exact match and "
                        "token F1 of the greedy answer (kvblend.eval.tasks)")
    p.add_argument("--templates", default=None,
                   help="with --task facts: comma-separated fact kinds to use (default: those full prefill answers)")
    p.add_argument("--ratios", default=None, help="comma-separated recompute ratios (default 0,0.05,0.15,0.3,1)")
    p.add_argument("--gate-bounds", default=None,
                   help="comma-separated quality gate bounds (full prefill above) of the gated cacheblend rows, or "
                        "'off' for none (default: kvblend.blend.gate.DEFAULT_GATE_BOUND)")
    p.add_argument("--gate-raise", type=float, default=None,
                   help="the gated rows also double their ratio above this bound (opt-in; the calibrated one is "
                        "kvblend.blend.gate.RAISE_BOUND)")
    p.add_argument("--gate-ratios", default=None, help="ratios of the gated rows (default: BlendConfig's ratio)")
    p.add_argument("--no-baselines", action="store_true", help="leave out the published selection, epic and random")
    p.add_argument("--codec", choices=CODECS, default="full",
                   help="store the chunks' KV through this storage codec, as a tier of that codec would")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    p.set_defaults(func=cmd_eval_fidelity)

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with the kvblend connector",
                       description="Start vLLM's OpenAI-compatible API server (/v1/completions, "
                                   "/v1/chat/completions, /metrics) on the model, with the kvblend connector in "
                                   "blend mode and the model loaded through kvblend's load format. Requests name "
                                   "their retrieved documents in kv_transfer_params (see docs/serving.md); without them "
                                   "cached chunks are found by content hash. Requests without kvblend parameters "
                                   "are served exactly (stored prefixes only) unless --discover-blend. vLLM server "
                                   "flags go after --.")
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: embedded SmolLM2)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--namespace", default=None, help="chunk store namespace (default: default)")
    p.add_argument("--policy", default=None, help=f"blend policy (default {DEFAULT_POLICY})")
    p.add_argument("--ratio", type=float, default=None, help=f"recompute ratio (default {DEFAULT_RATIO:g})")
    add_dtype_arg(p, "the vLLM engine's dtype")
    p.add_argument("--sampling", default=None,
                   help='JSON sampling defaults over kvblend\'s (greedy, frequency_penalty 0.5), e.g. '
                        '\'{"temperature": 0.7}\'; every request can override them')
    p.add_argument("--discover-blend", action="store_true",
                   help="blend requests that carry no kvblend parameters too (chunks found by content hash): "
                        "faster prefill for plain OpenAI clients, approximate answers they did not ask for")
    p.add_argument("--print-command", action="store_true",
                   help="print the equivalent plain-vLLM server command instead of starting it")
    p.add_argument("--disagg", choices=("prefill", "decode"), default=None,
                   help="disaggregated prefill: prefill composes kvblend's connector with vLLM's NixlConnector "
                        "(MultiConnector) to hand the blended KV to a decode instance; decode serves with "
                        "NixlConnector alone. Route requests with examples/pd_proxy.py (docs/multi-instance.md)")
    add_store_args(p)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM server flags (they win)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("model-dir", help="print (and on first use create) the model directory and its spec")
    p.add_argument("--model", type=Path, default=None)
    p.set_defaults(func=cmd_model_dir)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvblend.rag.config import RedisUnreachable
    from kvblend.rag.engine import configure_vllm_logging
    from kvblend.rag.kv_space import NotEnoughMemory

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    configure_vllm_logging("INFO" if args.verbose or args.command == "serve" else "ERROR")
    try:
        if hasattr(args, "store"):
            from kvblend.store.tiered import default_store_dir

            check_store_dir(args.store or default_store_dir())
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # CorpusError is a ValueError
        print(f"kvblend {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RedisUnreachable, NotEnoughMemory) as exc:
        print(f"kvblend {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"kvblend {args.command}: interrupted; finished chunks are stored, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
