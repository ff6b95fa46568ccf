"""The per-request quality gate (kvblend.blend.gate) on pydoc topics (SmolLM2, fp32, CPU).

calibrate: per case, the gate's signals at the first check layer (bound inf: measured, never acted on) beside the
    KL(full prefill || blend) of the default selection at fixed ratios (0.15, 0.30 and those between, for the
    equal-compute comparison); each case is appended to --jsonl as it finishes, so a stopped run still counts.
    python -m benchmarks.quality gate calibrate --cases 40 --seed 11 \
        --jsonl benchmarks/results/quality_gate_calibration_cpu.jsonl
analyse: from those lines, each signal's Spearman rank correlation (with a bootstrap interval) with the KL at
    r = 0.15 and with what raising to r = 0.30 gains; the gate's rule replayed at bounds set so that it raises a
    share of the requests (a raised request is exactly the r = 0.30 run: the raise happens in place at the first
    check layer), against the fixed ratio at the same mean compute (interpolated between the measured fixed
    ratios) and against an oracle that raises as many requests, those whose KL falls most.
    python -m benchmarks.quality gate analyse --jsonl benchmarks/results/quality_gate_calibration_cpu.jsonl \
        --out benchmarks/results/quality_gate_cpu.json
--tiny: one calibration case into a temp folder.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import git_sha, record, tiny_out, with_tiny, write
from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.prompt import chat_template
from kvblend.eval.fidelity import kl_per_token, make_cases, stored_chunk_refs
from kvblend.model.embedded import embedded_model_dir
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import encode, load_tokenizer
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.store.memory import MemoryTier
from kvblend.store.tiered import TieredStore

FIXED = (0.15, 0.2, 0.25, 0.3)
BASE, RAISED = "r0.15", "r0.3"


def ranks(v: list[float]) -> torch.Tensor:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = torch.zeros(len(v))
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def spearman(xs: list[float], ys: list[float]) -> float:
    rx, ry = ranks(xs), ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-30))


def bootstrap(xs: list[float], ys: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the Spearman correlation over cases resampled with replacement."""
    rng, n, out = random.Random(seed), len(xs), []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        out.append(spearman([xs[i] for i in idx], [ys[i] for i in idx]))
    out.sort()
    return out[int(0.025 * draws)], out[int(0.975 * draws) - 1]


def calibrate(args) -> None:
    model_dir = embedded_model_dir()
    model = LlamaModel.from_dir(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(tokenizer)
    store = TieredStore([MemoryTier(16 << 30)])
    engine = BlendEngine(model, store)
    cases = make_cases(tokenizer, pydoc_topics(), [], args.cases, args.chunk_tokens, (3, 5), seed=args.seed)
    sha = git_sha()
    for n, case in enumerate(cases):
        if n < args.skip:
            continue
        start = time.time()
        refs = stored_chunk_refs(model, store, case.chunks, "gate")
        layout = template.layout(tokenizer, refs, case.question)
        full = model.prefill(layout.token_ids(), logits_at=torch.arange(layout.suffix_start, layout.num_tokens))
        row = {"case": n, "seed": args.seed, "tokens": layout.num_tokens, "chunks": len(case.chunks),
               "question_tokens": len(encode(tokenizer, case.question)), "git_sha": sha}
        configs = [("reuse", BlendConfig("full_reuse", 0.0))]
        configs += [(f"r{r:g}", BlendConfig(ratio=r, gate_bound=float("inf") if r == 0.15 else None,
                                                gate_calibration=r == 0.15)) for r in FIXED]
        for name, config in configs:
            result = engine.blend(layout, config, logits_at="suffix")
            row[f"kl_{name}"] = float(kl_per_token(full.logits, result.logits).mean())
            row[f"compute_{name}"] = result.stats.compute_fraction
            if result.stats.gate:
                row["signals"] = result.stats.gate["signals"]
        row["seconds"] = round(time.time() - start, 1)
        with open(args.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def signals_of(c: dict) -> dict[str, float]:
    return {**c["signals"], "prompt tokens": c["tokens"], "chunks": c["chunks"],
            "question tokens": c["question_tokens"], "kl_reuse (not known at run time)": c["kl_reuse"]}


def correlations(cases: list[dict]) -> dict:
    """Spearman rho [95% bootstrap interval] of each signal with the KL at r = 0.15 and with the gain of r = 0.30."""
    kl = [c[f"kl_{BASE}"] for c in cases]
    gain = [c[f"kl_{BASE}"] - c[f"kl_{RAISED}"] for c in cases]
    out = {}
    for name in signals_of(cases[0]):
        xs = [signals_of(c)[name] for c in cases]
        out[name] = {"vs_kl": spearman(xs, kl), "vs_kl_ci": bootstrap(xs, kl),
                     "vs_gain": spearman(xs, gain), "vs_gain_ci": bootstrap(xs, gain)}
    return out


def fixed_curve(cases: list[dict]) -> list[tuple[float, float]]:
    """(mean compute, mean KL) of each fixed ratio measured, ascending."""
    n = len(cases)
    return [(sum(c[f"compute_r{r:g}"] for c in cases) / n, sum(c[f"kl_r{r:g}"] for c in cases) / n) for r in FIXED]


def fixed_at(curve: list[tuple[float, float]], compute: float) -> float | None:
    """The fixed ratios' mean KL at a mean compute, linear between measured ratios (None outside them)."""
    for (c0, k0), (c1, k1) in zip(curve, curve[1:]):
        if c0 <= compute <= c1:
            return k0 + (compute - c0) / (c1 - c0) * (k1 - k0)
    return None


def replay(cases: list[dict], signal: str, bound: float) -> dict:
    """The gate's rule on calibration cases: above the bound the request is the r = 0.30 run."""
    n = len(cases)
    up = [signals_of(c)[signal] > bound for c in cases]
    kl = sum(c[f"kl_{RAISED}" if u else f"kl_{BASE}"] for c, u in zip(cases, up)) / n
    compute = sum(c[f"compute_{RAISED}" if u else f"compute_{BASE}"] for c, u in zip(cases, up)) / n
    by_gain = sorted(cases, key=lambda c: c[f"kl_{BASE}"] - c[f"kl_{RAISED}"], reverse=True)
    raised = sum(up)
    oracle = (sum(c[f"kl_{RAISED}"] for c in by_gain[:raised]) + sum(c[f"kl_{BASE}"] for c in by_gain[raised:])) / n
    reuse = sum(c["kl_reuse"] for c in cases) / n
    fixed = fixed_at(fixed_curve(cases), compute)
    # the first design restarted a raised request at the last check layer (3): its stopped attempt computed layers
    # 0-1 in full and 2-3 on the first check's pool (twice the ratio) of a 30-layer model, on top of the raised run
    restart = compute + raised / n * (2 + 2 * 2 * 0.15) / 30
    return {"signal": signal, "bound": bound, "raised": raised / n, "kl_mean": kl, "gap_closed": 1 - kl / reuse,
            "compute": compute, "fixed_kl_same_compute": fixed,
            "fixed_gap_same_compute": None if fixed is None else 1 - fixed / reuse, "oracle_kl_same_raises": oracle,
            "restart_compute": restart, "fixed_kl_at_restart_compute": fixed_at(fixed_curve(cases), restart)}


def bound_for_share(cases: list[dict], signal: str, share: float) -> float:
    """The bound above which `share` of the cases' signal values lie (midway between neighbouring values)."""
    vals = sorted(signals_of(c)[signal] for c in cases)
    k = len(vals) - round(share * len(vals))
    if k <= 0:
        return vals[0] / 2
    if k >= len(vals):
        return vals[-1] * 2
    return (vals[k - 1] + vals[k]) / 2


def analyse(cases: list[dict], signals: list[str], shares: list[float], at: dict[str, float]) -> dict:
    """Correlations, the fixed ratios, the gate replayed at the bounds that raise `shares` of the cases and at the
    given bounds `at` (signal: bound, e.g. the calibration's applied to held-out cases)."""
    n = len(cases)
    replays = [replay(cases, signal, bound_for_share(cases, signal, share)) for signal in signals for share in shares]
    replays += [replay(cases, signal, bound) for signal, bound in at.items()]
    return record("quality_gate", replays, cases=n, seeds=sorted({c["seed"] for c in cases}),
                  git_shas=sorted({c["git_sha"] for c in cases}), kl_reuse=sum(c["kl_reuse"] for c in cases) / n,
                  fixed=[{"ratio": r, "compute": c, "kl_mean": k} for r, (c, k) in zip(FIXED, fixed_curve(cases))],
                  correlations=correlations(cases))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["calibrate", "analyse"])
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="calibrate: tokens per chunk")
    parser.add_argument("--skip", type=int, default=0, help="calibrate: start at this case (those before are done)")
    parser.add_argument("--jsonl", required=True, help="calibrate: appended per case; analyse: read")
    parser.add_argument("--signals", default="reused_attention,reused_deviation_attention",
                        help="analyse: signals to replay the gate on")
    parser.add_argument("--shares", default="0.25,0.33,0.5", help="analyse: shares of requests the replayed gate raises")
    parser.add_argument("--at", default="", help="analyse: SIGNAL=BOUND,... replayed at those bounds")
    parser.add_argument("--out", default=None, help="analyse: write the report here")
    args = parser.parse_args(argv)
    if args.mode == "calibrate":
        calibrate(args)
        return 0
    cases = [json.loads(line) for line in open(args.jsonl) if line.startswith("{")]
    at = {k: float(v) for k, v in (item.split("=") for item in args.at.split(",") if item)}
    report = analyse(cases, args.signals.split(","), [float(s) for s in args.shares.split(",")], at)
    if args.out:
        write(args.out, report)
    print(json.dumps(report, indent=1))
    return 0


TINY = ["calibrate", "--cases", "1", "--chunk-tokens", "32", "--jsonl", tiny_out("quality_gate.jsonl")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))
