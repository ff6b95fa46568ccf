"""The `kvblend` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def default_store_dir() -> Path:
    from kvblend.model.embedded import cache_dir

    return cache_dir() / "store"


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None, help="disk tier directory (default: ~/.cache/kvblend/store)")
    p.add_argument("--disk-gb", type=float, default=20.0, help="disk tier budget in GiB (default 20)")
    p.add_argument("--memory-gb", type=float, default=2.0, help="memory tier budget in GiB (default 2)")
    p.add_argument("--redis", default=os.environ.get("KVBLEND_REDIS_URL"), help="Redis tier URL, redis://host:port/db")


def open_cli_store(args: argparse.Namespace):
    from kvblend.store import StoreConfig, open_store

    return open_store(
        StoreConfig(
            memory_bytes=int(args.memory_gb * (1 << 30)),
            disk_dir=str(args.store or default_store_dir()),
            disk_bytes=int(args.disk_gb * (1 << 30)),
            redis_url=args.redis,
        )
    )


def cmd_precompute(args: argparse.Namespace) -> int:
    from kvblend.corpus import pydoc_topics, read_corpus
    from kvblend.model.embedded import resolve_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.precompute import PrecomputeConfig, text_chunks

    if not args.paths and not args.pydoc_topics:
        print("kvblend precompute: give PATH... or --pydoc-topics", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = PrecomputeConfig(chunk_tokens=args.chunk_tokens, namespace=args.namespace, max_chunks=args.max_chunks)
    docs = (pydoc_topics() if args.pydoc_topics else []) + read_corpus(args.paths)
    model_dir = resolve_model_dir(args.model)
    model = LlamaModel.from_dir(model_dir, dtype=args.dtype)
    chunks = text_chunks(load_tokenizer(model_dir), docs, config)
    with open_cli_store(args) as store:
        report = run_with_progress(model, store, chunks, config.namespace)
        print(f"{report.stored} chunks computed and stored, {report.cached} already cached "
              f"({sum(r.num_tokens for r in report.records)} tokens, model {model.spec.fingerprint[:12]}, "
              f"{model.spec.dtype})")
    return EXIT_OK


def run_with_progress(model, store, chunks, namespace):
    from tqdm import tqdm

    from kvblend.precompute import precompute_chunks

    with tqdm(total=len(chunks), unit="chunk", desc="precompute", file=sys.stderr) as bar:
        def tick(record):
            bar.update(1)
            bar.set_postfix(stored=record.stored)

        return precompute_chunks(model, store, chunks, namespace, on_chunk=tick)


def cmd_stats(args: argparse.Namespace) -> int:
    with open_cli_store(args) as store:
        for name, stats in store.stats().items():
            if name == "memory":
                continue
            print(f"{name:8s} entries={stats.entries} bytes={stats.bytes}")
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

    from kvblend.blend.fidelity import evaluate, gap_closed, make_cases, plot, read_questions, standard_settings
    from kvblend.blend.prompt import chat_template
    from kvblend.corpus import pydoc_topics, read_corpus
    from kvblend.model.embedded import resolve_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import load_tokenizer

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
    contexts = ("alone", "behind_prefix") if args.context == "both" else (args.context,)
    settings = standard_settings(args.chunk_tokens)
    with tqdm(total=len(cases), unit="case", desc="fidelity", file=sys.stderr) as bar:
        rows = evaluate(model, tokenizer, chat_template(tokenizer), cases, settings, contexts, args.greedy_steps,
                        progress=lambda: bar.update(1))
    for row in rows:
        row["gap_closed"] = gap_closed(rows, row)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "model": str(model_dir.name),
        "fingerprint": model.spec.fingerprint,
        "dtype": model.spec.dtype,
        "corpus": str(args.corpus),
        "cases": len(cases),
        "chunk_tokens": args.chunk_tokens,
        "chunks_per_case": list(chunks_per_case),
        "greedy_steps": args.greedy_steps,
        "git_sha": sha or None,
        "command": "kvblend " + " ".join(sys.argv[1:]),
        "settings": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(rows, args.plot, f"{model_dir.name}: {len(cases)} cases, {args.dtype}")
    print(f"{'context':14s} {'policy':13s} {'ratio':>5s} {'kl_mean':>8s} {'kl_p90':>8s} {'top1':>6s} "
          f"{'greedy32':>8s} {'match_len':>9s} {'gap':>6s}")
    for r in rows:
        print(f"{r['context']:14s} {r['policy']:13s} {r['ratio']:5.2f} {r['kl_mean']:8.4f} {r['kl_p90']:8.4f} "
              f"{r['top1']:6.3f} {r['greedy32_match']:8.3f} {r['greedy_match_len']:9.2f} {r['gap_closed']:6.2f}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvblend", description="CacheBlend-style KV reuse for RAG in vLLM")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("precompute", help="compute and store the KV cache of every chunk of some texts")
    p.add_argument("paths", nargs="*", type=Path, help=".txt/.md files or directories of them")
    p.add_argument("--pydoc-topics", action="store_true", help="add the stdlib's language reference topics")
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: embedded SmolLM2)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None, help="default: the model's")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--namespace", default="default")
    p.add_argument("--max-chunks", type=int, default=None)
    add_store_args(p)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("stats", help="entries and bytes held by each persistent tier")
    add_store_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("eval", help="evaluations")
    ev = p.add_subparsers(dest="evaluation", required=True)
    p = ev.add_parser("fidelity", help="blend vs full prefill: KL, top-1 and greedy agreement per policy and ratio")
    p.add_argument("--corpus", type=Path, required=True, help="directory of .txt/.md files, or 'pydoc' for the stdlib topics")
    p.add_argument("--questions", type=Path, default=None, help='JSONL, one {"question": "..."} per line')
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: embedded SmolLM2)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--chunks", default="4-6", help="chunks per case, N or LO-HI (default 4-6)")
    p.add_argument("--context", choices=["alone", "behind_prefix", "both"], default="alone",
                   help="how chunk KV is computed: alone from position 0, or behind the prompt prefix")
    p.add_argument("--greedy-steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    p.set_defaults(func=cmd_eval_fidelity)

    p = sub.add_parser("model-dir", help="print (and on first use create) the model directory and its spec")
    p.add_argument("--model", type=Path, default=None)
    p.set_defaults(func=cmd_model_dir)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kvblend.corpus import CorpusError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CorpusError, FileNotFoundError, ValueError) as exc:
        print(f"kvblend {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"kvblend {args.command}: interrupted; finished chunks are stored, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
