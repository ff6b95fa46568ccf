"""The per-request quality gate on pydoc topics (SmolLM2, fp32, CPU).

calibrate: per case, the gate's signals at each check layer (bound inf: measured, never acted on) beside the
    KL(full prefill || blend) of the default selection at r = 0.15 and 0.30, and their rank correlations; each
    case is also printed as a JSON line on stderr as it finishes.
    python benchmarks/quality_gate.py calibrate --cases 14 --json benchmarks/results/quality_gate_calibration.json
analyse: from those cases (the JSON, or the JSON lines), the gate's rule replayed at several bounds on the
    last check layer's error (above the bound: the r = 0.30 run plus the stopped attempt's compute, above twice
    the bound: full prefill), against fixed ratios at the same mean compute (linear between r = 0.15 and 0.30)
    and against an oracle that raises the same number of requests, those whose KL falls most.
    python benchmarks/quality_gate.py analyse --json benchmarks/results/quality_gate_calibration.json
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
from kvblend.blend.prompt import chat_template
from kvblend.eval.fidelity import kl_per_token, make_cases, stored_chunk_refs
from kvblend.model.embedded import embedded_model_dir
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import load_tokenizer
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
        refs = stored_chunk_refs(model, store, case.chunks, "gate")
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
    return {"cases": rows, **correlations(rows)}


def correlations(rows: list[dict]) -> dict:
    """Spearman rank correlation of each gate signal with the r = 0.15 KL, and with what raising r to 0.30 gains."""
    signals = {f"{what}@L{c['layer']}": [r["gate_r15"][i][what] for r in rows]
               for i, c in enumerate(rows[0]["gate_r15"])
               for what in ("error", "unselected_mass", "reused_attention", "agreement")}
    signals["prompt tokens"] = [r["tokens"] for r in rows]
    signals["kl_reuse (not available at run time)"] = [r["kl_reuse"] for r in rows]
    target = [r["kl_r15"] for r in rows]
    gain = [r["kl_r15"] - r["kl_r30"] for r in rows]
    return {"spearman_vs_kl_r15": {name: spearman(vals, target) for name, vals in signals.items()},
            "spearman_vs_kl_gain_r15_to_r30": {name: spearman(vals, gain) for name, vals in signals.items()}}


def load_cases(path: str) -> list[dict]:
    """Calibration cases from calibrate's JSON, or from the JSON lines it prints as cases finish."""
    text = open(path).read()
    try:
        return json.loads(text)["cases"]
    except ValueError:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def analyse(cases: list[dict], bounds: list[float]) -> dict:
    """Replay the gate's rule on calibration cases (r = 0.15 base, restart at 0.30 or as full prefill)."""
    n = len(cases)
    kl15 = sum(c["kl_r15"] for c in cases) / n
    kl30 = sum(c["kl_r30"] for c in cases) / n
    reuse = sum(c["kl_reuse"] for c in cases) / n
    c15 = sum(c["compute_r15"] for c in cases) / n
    c30 = sum(c["compute_r30"] for c in cases) / n

    def fixed_at(compute: float) -> float:
        t = (compute - c15) / (c30 - c15)
        return kl15 + t * (kl30 - kl15)

    rows = []
    for bound in bounds:
        kls, computes, raised, full = [], [], 0, 0
        for c in cases:
            err = c["gate_r15"][-1]["error"]
            # the stopped attempt: layers 0-1 every row, 2-3 the first check's kept rows (question rows left out)
            stop = (2 + 2 * c["gate_r15"][0]["kept_ratio"]) / 30
            if err > 2 * bound:
                kls.append(0.0), computes.append(1.0 + stop)
                full += 1
            elif err > bound:
                kls.append(c["kl_r30"]), computes.append(c["compute_r30"] + stop)
                raised += 1
            else:
                kls.append(c["kl_r15"]), computes.append(c["compute_r15"])
        kl, compute = sum(kls) / n, sum(computes) / n
        by_gain = sorted(cases, key=lambda c: c["kl_r15"] - c["kl_r30"], reverse=True)
        oracle = (sum(c["kl_r30"] for c in by_gain[:raised]) + sum(c["kl_r15"] for c in by_gain[raised:])) / n
        rows.append({"bound": bound, "raised": raised / n, "full_prefill": full / n, "kl_mean": kl,
                     "compute": compute, "fixed_ratio_kl_at_same_compute": fixed_at(compute) if full == 0 else None,
                     "oracle_kl_same_raises": oracle if full == 0 else None,
                     "gap_closed": (reuse - kl) / reuse})
    return {"cases": n, "kl_reuse": reuse, "kl_r15": kl15, "kl_r30": kl30, "compute_r15": c15, "compute_r30": c30,
            "gate": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["calibrate", "analyse"])
    parser.add_argument("--cases", type=int, default=14)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--bounds", default="0.025,0.03,0.035,0.04,0.05", help="analyse: gate bounds to replay")
    parser.add_argument("--json", required=True, help="calibrate: output; analyse: input (JSON or JSON lines)")
    parser.add_argument("--out", default=None, help="analyse: write the replay here")
    args = parser.parse_args()
    if args.mode == "analyse":
        cases = load_cases(args.json)
        report = {**correlations(cases), **analyse(cases, [float(b) for b in args.bounds.split(",")])}
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)
        print(json.dumps(report, indent=1))
        return 0
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
