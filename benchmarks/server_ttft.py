"""TTFT through `kvblend serve` with the official `openai` client (streaming): plain vLLM vs blended.

One server (embedded SmolLM2 in this CPU's compute dtype, kvblend.cpu; kvblend connector, load format kvblend).
Documents: 12 chunks of the Python language reference (RAGPipeline's 512-token chunker), their KV stored through
the server first (`kvblend.client.store_documents`). Each test prompt is a chat request: the system turn, 6 of the
documents in a new random order, a question. Per prompt, back to back on the same server:
  plain       kv_transfer_params mode "off": plain vLLM (its prefix cache on, no salt)
  named       the documents listed in kv_transfer_params (kvblend.client.blend_body(docs)), own cache salt
  discovered  no list: the connector finds the stored chunks by content hash, own cache salt
TTFT = first streamed content delta minus request start, on the client (HTTP, tokenization and the chat
template included); cached_tokens = the stream's usage.prompt_tokens_details.cached_tokens. One warm-up prompt
is not counted.
    python benchmarks/server_ttft.py --json benchmarks/results/server_ttft_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCS, DOCS_PER_PROMPT, CHUNK_TOKENS = 12, 6, 512
QUESTIONS = ["What does this say about exceptions?", "Summarize the statements described.",
             "Which syntax is defined here?", "What happens at run time?", "Give an example from the text.",
             "What are the rules for names?", "How is this evaluated?", "What is the main point?"]


def documents(seed: int) -> list[str]:
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.retrieval.chunker import ChunkerConfig, chunk_document
    from kvblend.retrieval.corpus import pydoc_topics

    tokenizer = load_tokenizer(embedded_model_dir())
    pool = [c.text.strip() for doc in pydoc_topics() for c in chunk_document(tokenizer, doc, ChunkerConfig(CHUNK_TOKENS))
            if len(c.token_ids) >= CHUNK_TOKENS * 4 // 5]
    return random.Random(seed).sample(pool, DOCS)


def run_info() -> dict:
    """Where and when a benchmark ran: CPU model, ISA flags and compute dtype, git sha, date, command, load average."""
    from kvblend.cpu import cpu_record

    return {
        "cpu": cpu_record(),
        "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "load_average": os.getloadavg(),
    }


def write_ttft_report(path: str, rows: dict[str, dict[str, list]], base: str, **extra) -> dict:
    """Per request kind the median TTFT and its speedup over `base`'s, with run_info and `extra`, written to `path`
    as JSON and printed as a table."""
    median = {m: statistics.median(r["ttft_ms"]) for m, r in rows.items()}
    report = {**run_info(), **extra,
              "rows": [{"mode": m, "ttft_ms_median": median[m], f"speedup_vs_{base}": median[base] / median[m], **r}
                       for m, r in rows.items()]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"\n| request | median TTFT ms | vs {base} | median cached tokens |\n|---|---:|---:|---:|")
    for row in report["rows"]:
        print(f"| {row['mode']} | {row['ttft_ms_median']:.1f} | {row[f'speedup_vs_{base}']:.2f}x | "
              f"{statistics.median(row['cached_tokens']):.0f} |")
    return report


def streamed_ttft(client, model: str, messages, body: dict) -> tuple[float, int]:
    from kvblend.client import cached_tokens

    start = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}, extra_body=body)
    for event in stream:
        if first is None and event.choices and event.choices[0].delta.content:
            first = time.perf_counter()
        usage = event.usage or usage
    return (first - start) * 1e3, cached_tokens(usage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/server_ttft_cpu.json")
    args = parser.parse_args()
    from openai import OpenAI

    from kvblend.client import blend_body, plain_body, rag_messages, store_documents
    from kvblend.server import ServerProcess

    docs = documents(args.seed)
    rng = random.Random(args.seed + 1)
    tests = [(rng.sample(docs, DOCS_PER_PROMPT), QUESTIONS[i % len(QUESTIONS)]) for i in range(args.prompts + 1)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    env.pop("TRITON_INTERPRET", None)
    started = time.time()
    rows: dict[str, dict[str, list]] = {m: {"ttft_ms": [], "cached_tokens": []} for m in ("plain", "named", "discovered")}
    with tempfile.TemporaryDirectory(prefix="kvblend-serve-bench-") as store_dir, \
            ServerProcess(["--store", store_dir], env=env) as server:
        client = OpenAI(base_url=server.base_url, api_key="none", timeout=600)
        store_documents(client, server.model, docs)
        for i, (parts, question) in enumerate(tests):
            messages = rag_messages(question, parts)
            for mode, body in (("plain", plain_body()), ("named", blend_body(parts)), ("discovered", blend_body())):
                ttft, cached = streamed_ttft(client, server.model, messages, body)
                if i > 0:  # the first prompt warms up
                    rows[mode]["ttft_ms"].append(ttft)
                    rows[mode]["cached_tokens"].append(cached)
            if i > 0:
                print(f"prompt {i}: " + ", ".join(f"{m} {r['ttft_ms'][-1]:.0f} ms" for m, r in rows.items()), flush=True)
    write_ttft_report(args.json, rows, "plain", seconds=round(time.time() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
