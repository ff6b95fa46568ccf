"""TTFT through `kvblend serve` with the official `openai` client: plain vLLM vs blended, documents sent as text
through the chat API and, for comparison, the same prompts as token ids through the completions API.

One server (embedded SmolLM2 in this CPU's compute dtype, kvblend.cpu; kvblend connector, load format kvblend).
Documents: whole language-reference topics (pydoc_data), cut by the chunker into 512-token chunks, their KV
computed offline by `kvblend precompute FILES --store DIR` (the torch runner; `--fill server`: stored through the
server with `kvblend.client.store_documents` instead); 12 of the full chunks are the documents. Each test prompt:
the system turn, 6 of the documents' texts in a new random order, a question. Per prompt, back to back:
  chat_plain       rag_messages(question, texts), kv_transfer_params mode "off": plain vLLM (prefix cache on)
  chat_named       the same messages, the texts listed in kv_transfer_params (blend_body(texts)), own cache salt
  chat_discovered  the same messages, no list (blend_body()): stored chunks found by content hash
  ids_named        the pipeline's layout as token ids (chat template around the chunks' ids) on /v1/completions,
                   the documents named as token-id lists (its plain counterpart is chat_plain: the same documents
                   and question, a prompt of the same length, so the plain prefill is not paid twice per prompt)
TTFT = the latency of a non-streamed request for one token, on the client (HTTP, tokenization and the chat
template included): the prefill plus one sampled token; the kvblend report of each request gives documents
found and chunks blended. One warm-up prompt is not counted.
    python -m benchmarks.vllm_cpu server [--tiny] [--prompts N] [--fill precompute|server] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write  # noqa: E402

DOCS, DOCS_PER_PROMPT, CHUNK_TOKENS = 12, 6, 512
QUESTIONS = ["What does this say about exceptions?", "Summarize the statements described.",
             "Which syntax is defined here?", "What happens at run time?", "Give an example from the text.",
             "What are the rules for names?", "How is this evaluated?", "What is the main point?"]
MODES = ("chat_plain", "chat_named", "chat_discovered", "ids_named")


def documents(tokenizer, seed: int) -> tuple[list, list]:
    """(topics, chunks): whole topics, taken in a random order until they hold DOCS full chunks, and DOCS of
    those chunks (the ones at least 80% of CHUNK_TOKENS)."""
    from kvblend.retrieval.chunker import ChunkerConfig, chunk_document
    from kvblend.retrieval.corpus import pydoc_topics

    rng = random.Random(seed)
    topics, pool = [], []
    for doc in rng.sample(pydoc_topics(), len(pydoc_topics())):
        full = [c for c in chunk_document(tokenizer, doc, ChunkerConfig(CHUNK_TOKENS))
                if len(c.token_ids) >= CHUNK_TOKENS * 4 // 5]
        if full:
            topics.append(doc)
            pool += full
        if len(pool) >= DOCS:
            return topics, rng.sample(pool, DOCS)
    raise RuntimeError("the language reference holds too few full chunks")


def write_ttft_report(suite: str, path: str, rows: dict[str, dict[str, list]], base: str, **extra) -> dict:
    """Per request kind the median TTFT and its speedup over `base`'s, in the harness's record of `suite` with the
    load average and `extra`, written to `path` as JSON and printed as a table."""
    median = {m: statistics.median(r["ttft_ms"]) for m, r in rows.items()}
    report = record(suite, [{"mode": m, "ttft_ms_median": median[m], f"speedup_vs_{base}": median[base] / median[m],
                             **r} for m, r in rows.items()], load_average=os.getloadavg(), **extra)
    write(path, report)
    print(f"\n| request | median TTFT ms | vs {base} | median cached tokens |\n|---|---:|---:|---:|")
    for row in report["rows"]:
        print(f"| {row['mode']} | {row['ttft_ms_median']:.1f} | {row[f'speedup_vs_{base}']:.2f}x | "
              f"{statistics.median(row['cached_tokens']):.0f} |")
    return report


def timed(create, **request) -> tuple[float, dict, int]:
    """(latency ms, kvblend report, cached tokens) of one non-streamed one-token request."""
    from kvblend.client import cached_tokens, kvblend_report

    start = time.perf_counter()
    reply = create(**request, max_tokens=1)
    return (time.perf_counter() - start) * 1e3, kvblend_report(reply), cached_tokens(reply.usage)


def precompute_offline(topics: list, store_dir: str, env: dict) -> None:
    """`kvblend precompute FILES --store DIR` on the topics written as text files (no index)."""
    with tempfile.TemporaryDirectory(prefix="kvblend-topics-") as folder:
        files = []
        for doc in topics:
            path = Path(folder) / (doc.title.replace("/", "_") + ".txt")
            path.write_text(doc.text, encoding="utf-8")
            files.append(str(path))
        subprocess.run([sys.executable, "-m", "kvblend.cli", "precompute", *files, "--store", store_dir,
                        "--chunk-tokens", str(CHUNK_TOKENS)], env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fill", choices=["precompute", "server"], default="precompute")
    parser.add_argument("--json", default=str(result_path("vllm_cpu_server")))
    args = parser.parse_args(argv)
    from openai import OpenAI

    from kvblend.blend.prompt import chat_template
    from kvblend.client import blend_body, plain_body, rag_messages, store_documents
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.tokenizer import encode, load_tokenizer
    from kvblend.rag.prompt import build_rag_prompt
    from kvblend.server import ServerProcess

    tokenizer = load_tokenizer(embedded_model_dir())
    template, separator = chat_template(tokenizer), encode(tokenizer, "\n\n")
    topics, chunks = documents(tokenizer, args.seed)
    rng = random.Random(args.seed + 1)
    tests = [(rng.sample(chunks, DOCS_PER_PROMPT), QUESTIONS[i % len(QUESTIONS)]) for i in range(args.prompts + 1)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    env.pop("TRITON_INTERPRET", None)
    started = time.time()
    rows: dict[str, dict[str, list]] = {m: {"ttft_ms": [], "cached_tokens": [], "documents": [],
                                            "documents_found": [], "chunks": []} for m in MODES}
    with tempfile.TemporaryDirectory(prefix="kvblend-serve-bench-") as store_dir:
        if args.fill == "precompute":
            precompute_offline(topics, store_dir, env)
        with ServerProcess(["--store", store_dir], env=env) as server:
            client = OpenAI(base_url=server.base_url, api_key="none", timeout=600)
            if args.fill == "server":
                store_documents(client, server.model, [c.text for c in chunks])
            chat, complete = client.chat.completions.create, client.completions.create
            for i, (parts, question) in enumerate(tests):
                texts = [c.text for c in parts]
                messages = rag_messages(question, texts)
                ids = build_rag_prompt(template, [c.token_ids for c in parts], separator,
                                       encode(tokenizer, question)).token_ids
                requests = {
                    "chat_plain": (chat, dict(messages=messages, extra_body=plain_body())),
                    "chat_named": (chat, dict(messages=messages, extra_body=blend_body(texts))),
                    "chat_discovered": (chat, dict(messages=messages, extra_body=blend_body())),
                    "ids_named": (complete, dict(prompt=ids, extra_body=blend_body([c.token_ids for c in parts]))),
                }
                for mode, (create, request) in requests.items():
                    ttft, report, cached = timed(create, model=server.model, **request)
                    if i == 0:  # the first prompt warms up
                        continue
                    row = rows[mode]
                    row["ttft_ms"].append(ttft)
                    row["cached_tokens"].append(cached)
                    row["documents"].append(report.get("documents", 0))
                    row["documents_found"].append(report.get("documents_found", 0))
                    row["chunks"].append(report.get("chunks", 0))
                if i > 0:
                    print(f"prompt {i}: " + ", ".join(f"{m} {r['ttft_ms'][-1]:.0f} ms ({r['chunks'][-1]} chunks)"
                                                      for m, r in rows.items()), flush=True)
    found = {m: f"{sum(r['documents_found'])}/{sum(r['documents'])} named, {sum(r['chunks'])} chunks blended"
             for m, r in rows.items()}
    print("\n".join(f"{m}: {f}" for m, f in found.items()))
    write_ttft_report("vllm_cpu_server", args.json, rows, "chat_plain", seconds=round(time.time() - started, 1), fill=args.fill,
                      found=found, prompts_of=f"{DOCS_PER_PROMPT} x {CHUNK_TOKENS}-token chunks + question")
    return 0


TINY = ["--prompts", "1", "--json", tiny_out("vllm_cpu_server.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
