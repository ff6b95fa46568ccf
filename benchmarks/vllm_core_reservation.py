"""Why plain vLLM and a connector engine must get the same cores: vLLM's CPU worker keeps one core for the engine
process, and one more when any KV connector is configured; on a 2-core machine it then keeps none.

Each engine prefills the same random 3100-token prompts (no cache hit possible) and reports TTFT per prompt:
no connector, vLLM's own ExampleConnector, kvblend's connector (storage mode, extraction off). One engine per
process (vLLM binds the worker's cores at start), as given by --engine.
    for e in plain example kvblend; do python benchmarks/vllm_core_reservation.py --engine $e; done
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from vllm_rag_ttft import ttft_ms  # noqa: E402


def connector(engine: str, store_dir: str):
    from vllm.config import KVTransferConfig

    if engine == "example":
        return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                kv_connector_extra_config={"shared_storage_path": store_dir})
    if engine == "kvblend":
        return KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm.connector",
                                kv_role="kv_both", kv_load_failure_policy="recompute",
                                kv_connector_extra_config={"mode": "storage", "store_dir": store_dir, "extract": False})
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["plain", "example", "kvblend"], required=True)
    parser.add_argument("--prompts", type=int, default=7)
    parser.add_argument("--dtype", default=None, help="the engine's dtype (default: this CPU's, kvblend.cpu)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from kvblend.cpu import cpu_compute_dtype, cpu_record
    from kvblend.model.embedded import embedded_model_dir

    dtype = args.dtype or cpu_compute_dtype()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="kvblend-cores-") as store_dir:
        llm = LLM(model=str(embedded_model_dir()), dtype=dtype, max_model_len=4096, enforce_eager=True,
                  max_num_seqs=4, seed=0, enable_prefix_caching=True, disable_log_stats=False,
                  kv_transfer_config=connector(args.engine, store_dir))
        params = SamplingParams(max_tokens=2, temperature=0.0)
        times = []
        for _ in range(args.prompts):
            ids = [rng.randrange(100, 40000) for _ in range(3100)]
            times.append(ttft_ms(llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]))
        llm.llm_engine.engine_core.shutdown()
    print(f"{args.engine}: TTFT median {statistics.median(times):.0f} ms ({', '.join(f'{t:.0f}' for t in times)}), "
          f"VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU', 'unset')}, {dtype}, "
          f"CPU {cpu_record()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
