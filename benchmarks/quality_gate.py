"""The per-request quality gate on pydoc topics (SmolLM2, fp32, CPU).

calibrate: per case, the gate's signals at each check layer (bound inf: measured, never acted on) beside the
    KL(full prefill || blend) of the default selection at r = 0.15 and 0.30, and their rank correlations.
    python benchmarks/quality_gate.py calibrate --cases 16 --json benchmarks/results/quality_gate_calibration.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.layout import ChunkRef
from kvblend.blend.prompt import chat_template
from kvblend.eval.fidelity import kl_per_token, make_cases
from kvblend.model.embedded import embedded_model_dir
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import load_tokenizer
from kvblend.rag.precompute import chunk_key, compute_chunk_kv
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.store.memory import MemoryTier
from kvblend.store.tiered import TieredStore


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    rx, ry = torch.tensor(ranks(xs)), torch.tensor(ranks(ys))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-30))


def calibrate(args) -> dict:
    model_dir = embedded_model_dir()
    model = LlamaModel.from_dir(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(tokenizer)
    store = TieredStore([MemoryTier(16 << 30)])
    engine = BlendEngine(model, store)
    cases = make_cases(tokenizer, pydoc_topics(), [], args.cases, 256, (3, 5), seed=args.seed)
    rows = []
    for case in cases:
        refs = []
        for ids in case.chunks:
            key = chunk_key(model, ids, "gate", None)
            if not store.contains(key):
                store.put(key, compute_chunk_kv(model, key, ids, None))
            refs.append(ChunkRef(ids, key))
        layout = template.layout(tokenizer, refs, case.question)
        full = model.prefill(layout.token_ids(), logits_at=torch.arange(layout.suffix_start, layout.num_tokens))
        row = {"tokens": layout.num_tokens}
        for name, config in (("reuse", BlendConfig("full_reuse", 0.0)),
                             ("r15", BlendConfig(ratio=0.15, gate_bound=float("inf"))),
                             ("r30", BlendConfig(ratio=0.30, gate_bound=float("inf")))):
            result = engine.blend(layout, config, logits_at="suffix")
            row[f"kl_{name}"] = float(kl_per_token(full.logits, result.logits).mean())
            row[f"compute_{name}"] = result.stats.compute_fraction
            if result.stats.gate:
                row[f"gate_{name}"] = result.stats.gate["checks"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    signals = {f"{what}@L{c['layer']}": [r["gate_r15"][i][what] for r in rows]
               for i, c in enumerate(rows[0]["gate_r15"])
               for what in ("error", "unselected_mass", "reused_attention", "agreement")}
    target = [r["kl_r15"] for r in rows]
    corr = {name: spearman(vals, target) for name, vals in signals.items()}
    corr["kl_reuse (not available at run time)"] = spearman([r["kl_reuse"] for r in rows], target)
    gain = [r["kl_r15"] - r["kl_r30"] for r in rows]
    corr_gain = {name: spearman(vals, gain) for name, vals in signals.items()}
    corr["prompt tokens"] = spearman([r["tokens"] for r in rows], target)
    return {"cases": rows, "spearman_vs_kl_r15": corr, "spearman_vs_kl_gain_r15_to_r30": corr_gain}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["calibrate"])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    start = time.time()
    report = calibrate(args)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report.update({"mode": args.mode, "seed": args.seed, "git_sha": sha, "seconds": time.time() - start,
                   "command": "python " + " ".join(sys.argv), "torch_threads": torch.get_num_threads()})
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps({k: report[k] for k in ("spearman_vs_kl_r15", "spearman_vs_kl_gain_r15_to_r30")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
