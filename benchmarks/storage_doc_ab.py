"""A document asked again, inside vLLM, in kvblend storage mode: TTFT of each repeat, for an A/B of two versions of
the connector's load path (run this file from each version's tree, engines one after the other).

    python benchmarks/storage_doc_ab.py --label after [--rounds 4] [--json benchmarks/results/storage_doc_ab.json]

workloads.py's first two long-document prompts (3.6k tokens, 28 spans of 128), asked in turn `--rounds` times on
one engine whose KV space (5120 tokens) holds one document, so every ask after the first of each document evicts
the other's blocks and is served from kvblend's memory tier (1 GiB: both documents fit) over a disk tier. TTFT =
first_token_ts - queued_ts; results are appended to --json under --label.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", default="benchmarks/results/storage_doc_ab.json")
    args = parser.parse_args()
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from workloads import DTYPE, KV_TOKENS, corpus_tokens, document_requests, serve, start_engine, stop_engine

    from kvblend.cpu import cpu_record
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.spec import load_spec
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.rag.kv_space import kv_space_bytes

    model_dir = embedded_model_dir()
    tokenizer = load_tokenizer(model_dir)
    docs = document_requests(tokenizer, corpus_tokens(tokenizer), 3, args.rounds, 0, 0)
    asks = [r for r in docs if r.who < 2]
    kv_bytes = kv_space_bytes(load_spec(model_dir, DTYPE), KV_TOKENS, 1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kvblend-doc-ab-") as store_dir:
        kv = {"kv_connector": "KVBlendConnector", "kv_connector_module_path": "kvblend.vllm.connector",
              "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {"mode": "storage", "store_dir": store_dir, "memory_gb": 1.0,
                                            "span_tokens": 128}}
        llm = start_engine(model_dir, kv, kv_bytes)
        try:
            result = serve(llm, asks, {"mode": "storage"})
        finally:
            stop_engine(llm)
    repeats = [t for t, c in zip(result.ttft_ms[2:], result.cached_tokens[2:]) if c > 0]
    row = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True, check=False).stdout.strip(),
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "ttft_ms": result.ttft_ms,
           "cached_tokens": result.cached_tokens, "repeat_ttft_ms_median": statistics.median(repeats),
           "first_ask_ttft_ms": result.ttft_ms[:2], "cpu": cpu_record()}
    path = Path(args.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows + [row], indent=1))
    print(f"{args.label}: repeats {', '.join(f'{t:.0f}' for t in repeats)} ms (median {row['repeat_ttft_ms_median']:.0f}); "
          f"first asks {', '.join(f'{t:.0f}' for t in result.ttft_ms[:2])} ms; load {load_before[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
