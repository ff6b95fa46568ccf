"""What the quality gate, on by default, costs a request (CPU; run under the engine lock: it is a timing).

runner: kvblend's torch runner (SmolLM2 fp32), one pydoc-topic case of 3-5 chunks x 256 tokens + a question per
    prompt; per prompt the blend at r = 0.15 with the gate off, at its default (the deciding signal only) and
    calibrating (every signal: two extra fp32 attention passes), in rotating order, --reps times. Reports the
    median blend ms of each and the gate's own stage time (BlendStats.stage_ms["gate"]).
    python benchmarks/gate_cost.py runner --prompts 4 --reps 5 --json benchmarks/results/gate_cost_runner.json
vllm: one kvblend engine (vllm_rag_ttft.py's prompts: 6 chunks x 512 tokens), the same prompts blended with the
    gate "off" and at its default, alternating off/on/off/on; TTFT medians.
    python benchmarks/gate_cost.py vllm --prompts 3 --json benchmarks/results/gate_cost_vllm.json
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

SETTINGS = ("off", "default", "calibration")


def runner(args) -> dict:
    import torch

    from kvblend.blend.config import BlendConfig
    from kvblend.blend.engine import BlendEngine
    from kvblend.blend.prompt import chat_template
    from kvblend.eval.fidelity import make_cases, stored_chunk_refs
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.retrieval.corpus import pydoc_topics
    from kvblend.store.memory import MemoryTier
    from kvblend.store.tiered import TieredStore

    model_dir = embedded_model_dir()
    model = LlamaModel.from_dir(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(tokenizer)
    store = TieredStore([MemoryTier(8 << 30)])
    engine = BlendEngine(model, store)
    configs = {"off": BlendConfig(gate_bound=None), "default": BlendConfig(),
               "calibration": BlendConfig(gate_calibration=True)}
    rows = []
    for n, case in enumerate(make_cases(tokenizer, pydoc_topics(), [], args.prompts, 256, (3, 5), seed=args.seed)):
        layout = template.layout(tokenizer, stored_chunk_refs(model, store, case.chunks, "cost"), case.question)
        engine.blend(layout, configs["off"])  # warm-up
        times = {name: [] for name in SETTINGS}
        gate_ms = {name: [] for name in SETTINGS}
        for rep in range(args.reps):
            for name in SETTINGS[rep % 3:] + SETTINGS[: rep % 3]:  # rotate the order
                start = time.perf_counter()
                result = engine.blend(layout, configs[name])
                times[name].append((time.perf_counter() - start) * 1e3)
                gate_ms[name].append(result.stats.stage_ms.get("gate", 0.0))
                if name == "default":
                    decision = result.stats.gate["decision"]
        rows.append({"prompt": n, "tokens": layout.num_tokens, "decision": decision,
                     **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                     **{f"{k}_gate_stage_ms": statistics.median(v) for k, v in gate_ms.items()},
                     "all_ms": times})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "all_ms"}), flush=True)
    return {"threads": torch.get_num_threads(), "rows": rows}


def vllm(args) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    sys.path.insert(0, str(Path(__file__).parent))
    from vllm_rag_ttft import build_prompts, run_engine

    from kvblend.cpu import cpu_compute_dtype
    from kvblend.model.embedded import embedded_model_dir
    from kvblend.model.tokenizer import load_tokenizer

    dtype = args.dtype or cpu_compute_dtype()
    model_dir = embedded_model_dir()
    chunks, history, tests = build_prompts(load_tokenizer(model_dir), args.prompts, args.seed)
    modes = [(f"gate_{name}_{i}", {"mode": "blend", "ratio": 0.15, **({"gate_bound": "off"} if name == "off" else {})},
              f"gate-{name}-{i}") for i in (1, 2) for name in ("off", "default")]
    with tempfile.TemporaryDirectory(prefix="kvblend-gate-") as store_dir:
        results = run_engine(model_dir, dtype, {"mode": "blend", "store_dir": store_dir, "span_tokens": 256},
                             chunks, history, tests, modes)
    results.pop("worker_memory")
    summary = {}
    for name in ("off", "default"):
        times = [t for mode, r in results.items() if mode.startswith(f"gate_{name}_") for t in r["ttft_ms"]]
        summary[name] = {"ttft_ms_median": statistics.median(times), "ttft_ms": times}
    gates = [rep.get("gate") for mode, r in results.items() if mode.startswith("gate_default") for rep in r["reports"]]
    return {"dtype": dtype, "prompt_tokens": [len(ids) for ids, _ in tests], "summary": summary,
            "gate_reports": gates, "modes": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["runner", "vllm"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="vllm: the engine's dtype (default: this CPU's)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    from kvblend.cpu import cpu_record

    started = time.time()
    out = runner(args) if args.mode == "runner" else vllm(args)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    report = {"cpu": cpu_record(), "git_sha": sha.stdout.strip(), "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_average": os.getloadavg(),
              "seconds": round(time.time() - started, 1), **out}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("rows", "modes", "gate_reports")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
