"""`make demo`: precompute and store chunk KV for the Python language reference topics, then report hits.

Run it twice: the second run finds every chunk in the store and computes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from kvblend.cli import default_store_dir

DEMO_TOPICS = ("assignment", "class", "compound", "exceptions", "execmodel", "function", "import", "lambda")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default=str(default_store_dir()))
    parser.add_argument("--redis", default=os.environ.get("KVBLEND_REDIS_URL"))
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--max-chunks", type=int, default=48)
    args = parser.parse_args(argv)

    from kvblend.corpus import pydoc_topics
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.precompute import PrecomputeConfig, precompute_chunks, text_chunks
    from kvblend.store import StoreConfig, open_store

    model_dir = embedded_model_dir()
    model = LlamaModel.from_dir(model_dir)
    spec = model.spec
    print(f"model  {model_dir}\n       {spec.architecture}, {spec.num_layers} layers, {spec.num_kv_heads} KV heads x "
          f"{spec.head_dim}, {spec.dtype}, fingerprint {spec.fingerprint[:16]}")
    print(f"store  memory + disk {args.store}" + (f" + redis {args.redis}" if args.redis else ""))
    config = PrecomputeConfig(chunk_tokens=args.chunk_tokens, max_chunks=args.max_chunks)
    chunks = text_chunks(load_tokenizer(model_dir), pydoc_topics(DEMO_TOPICS), config)
    print(f"corpus {len(chunks)} chunks of <= {args.chunk_tokens} tokens from pydoc_data.topics {', '.join(DEMO_TOPICS)}\n")
    print(f"{'source':22s} {'#':>3s} {'tokens':>6s} {'key':14s} {'status':8s} {'ms':>7s}")

    def show(r):
        print(f"{r.source:22s} {r.index:3d} {r.num_tokens:6d} {r.key.digest[:12]:14s} "
              f"{'stored' if r.stored else 'cached':8s} {r.seconds * 1e3:7.1f}")

    start = time.perf_counter()
    with open_store(StoreConfig(disk_dir=args.store, redis_url=args.redis)) as store:
        report = precompute_chunks(model, store, chunks, on_chunk=show)
        stats = store.stats()
    kv_bytes = sum(r.num_tokens for r in report.records) * spec.kv_bytes_per_token
    print(f"\n{report.stored} computed and stored, {report.cached} found in the store "
          f"({kv_bytes / 2**20:.1f} MiB of KV) in {time.perf_counter() - start:.1f} s")
    for name, s in stats.items():
        print(f"  {name:7s} entries={s.entries:5d} bytes={s.bytes / 2**20:8.1f} MiB hits={s.hits} puts={s.puts}")
    if report.stored:
        print("run `make demo` again: every chunk is now a store hit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
