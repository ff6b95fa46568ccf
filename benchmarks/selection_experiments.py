"""Selection experiments toward closing 90% of the KL gap at a 15% recompute budget (SmolLM2, fp32, CPU).

Every variant runs on the same cases as the published CacheBlend selection, full reuse and full prefill, and
every result is recorded, kept or not:
    python benchmarks/selection_experiments.py --cases 12 --json benchmarks/results/selection_experiments.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace

import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.prompt import chat_template
from kvblend.eval.fidelity import Setting, evaluate, gap_closed, make_cases
from kvblend.eval.tasks import planted_cases, task_templates
from kvblend.model.embedded import embedded_model_dir
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import load_tokenizer
from kvblend.retrieval.corpus import pydoc_topics

R = 0.15


def variants(round_: int) -> list[Setting]:
    def cb(name: str, **kw) -> Setting:
        """A variant of the published selection (check layer 1, K+V deviation) with `kw` changed."""
        return Setting("cacheblend", R, replace(BlendConfig.published(R), **kw), variant=name)

    def default(name: str, **kw) -> Setting:
        """The default selection (kvblend's BlendConfig, gate off) with `kw` changed."""
        return Setting("cacheblend", R, replace(BlendConfig(gate_bound=None), **kw), variant=name)

    ends = [Setting("full_reuse", 0.0, BlendConfig("full_reuse", 0.0)),
            Setting("full_prefill", 1.0, BlendConfig("full_prefill", 1.0)),
            cb("published: check layer 1, K+V deviation")]
    if round_ == 1:
        return ends + [
            cb("K deviation only", deviation="k"),
            cb("V deviation only", deviation="v"),
            cb("check layer 2 (layers 0-2 full)", check_layers=(2,)),
            cb("gradual 1,2: 0.30 -> 0.15", check_layers=(1, 2), schedule=(0.3, R)),
            cb("gradual 1,2,3: 0.30 -> 0.20 -> 0.15", check_layers=(1, 2, 3), schedule=(0.3, 0.2, R)),
            cb("gradual 1,4,8: 0.50 -> 0.25 -> 0.15", check_layers=(1, 4, 8), schedule=(0.5, 0.25, R)),
            cb("chunk heads 4 + deviation", head_tokens=4),
            cb("chunk heads 16 + deviation", head_tokens=16),
            cb("attention-weighted deviation", attention_weighted=True),
            cb("attention-weighted + heads 4", attention_weighted=True, head_tokens=4),
            cb("attention-weighted, gradual 1,2", attention_weighted=True, check_layers=(1, 2), schedule=(0.3, R)),
            Setting("epic", R, BlendConfig("epic", R, epic_tokens=round(R * 256)), variant="EPIC at the same budget"),
            Setting("random", R, BlendConfig("random", R), variant="random selection"),
        ]
    if round_ == 4:
        return [ends[0], ends[1], default("default: attn-weighted, gradual 1,3: 0.30 -> 0.15"),
                default("default at r = 0.18 (equal-compute reference)", ratio=0.18),
                default("question pass (ProphetKV-style) weighting at 1 and 3", weighting="question_pass"),
                default("question pass x check-layer attention at 1 and 3", weighting="both"),
                default("question pass only, check 0", weighting="question_pass", deviation="none", check_layers=(0,)),
                default("question pass only, check 0, r = 0.18", ratio=0.18, weighting="question_pass",
                        deviation="none", check_layers=(0,))]
    if round_ == 5:  # held out: the default against the question-pass selections of round 4
        qp = {"weighting": "question_pass", "deviation": "none", "check_layers": (0,)}
        return [ends[0], ends[1], default("default: attn-weighted, gradual 1,3: 0.30 -> 0.15"),
                default("default at r = 0.18 (equal-compute reference)", ratio=0.18),
                default("question pass x check-layer attention at 1 and 3", weighting="both"),
                default("question pass only, check 0", **qp),
                default("question pass only, check 0, r = 0.18", ratio=0.18, **qp)]
    if round_ == 6:  # task accuracy on planted facts: the default against the best variant of round 4's first case
        return [ends[0], ends[1], default("default"),
                default("question pass x check-layer attention at 1 and 3", weighting="both")]
    if round_ == 3:
        aw = dict(attention_weighted=True)
        return ends + [
            cb("attn-weighted, gradual 1,3: 0.30 -> 0.15", check_layers=(1, 3), schedule=(0.3, R), **aw),
            cb("attn-weighted, gradual 1,4: 0.30 -> 0.15", check_layers=(1, 4), schedule=(0.3, R), **aw),
            cb("attn-weighted, gradual 1,6: 0.30 -> 0.15", check_layers=(1, 6), schedule=(0.3, R), **aw),
            cb("attn-weighted, gradual 1,3,6: 0.30 -> 0.20 -> 0.15", check_layers=(1, 3, 6), schedule=(0.3, 0.2, R), **aw),
            cb("attn-weighted, gradual 1,4: 0.40 -> 0.15", check_layers=(1, 4), schedule=(0.4, R), **aw),
            cb("attention only, gradual 1,3: 0.30 -> 0.15", deviation="none", check_layers=(1, 3), schedule=(0.3, R), **aw),
            cb("attention only, check layer 1", deviation="none", **aw),
        ]
    return ends + [
        cb("attn-weighted, gradual 1,2: 0.30 -> 0.15", attention_weighted=True, check_layers=(1, 2), schedule=(0.3, R)),
        cb("attn-weighted, gradual 1,2: 0.50 -> 0.15", attention_weighted=True, check_layers=(1, 2), schedule=(0.5, R)),
        cb("attn-weighted, gradual 1,2,3: 0.30 -> 0.20 -> 0.15", attention_weighted=True, check_layers=(1, 2, 3),
           schedule=(0.3, 0.2, R)),
        cb("attn-weighted, gradual 1,3: 0.30 -> 0.15", attention_weighted=True, check_layers=(1, 3), schedule=(0.3, R)),
        cb("attn-weighted, check layer 2", attention_weighted=True, check_layers=(2,)),
        cb("attn-weighted V, gradual 1,2: 0.30 -> 0.15", deviation="v", attention_weighted=True, check_layers=(1, 2),
           schedule=(0.3, R)),
        cb("attn-weighted, gradual 1,2: 0.20 -> 0.15", attention_weighted=True, check_layers=(1, 2), schedule=(0.2, R)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--greedy-steps", type=int, default=32)
    parser.add_argument("--round", type=int, default=3, choices=[1, 2, 3, 4, 5, 6], help="which set of variants")
    parser.add_argument("--chunks", default="4-6", help="chunks per case, LO-HI")
    parser.add_argument("--task", choices=["none", "facts"], default="none",
                        help="facts: plant a fact per case and score the greedy answer (kvblend.eval.tasks)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    model_dir = embedded_model_dir()
    model = LlamaModel.from_dir(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    lo, _, hi = args.chunks.partition("-")
    cases = make_cases(tokenizer, pydoc_topics(), [], args.cases, 256, (int(lo), int(hi or lo)), seed=args.seed)
    if args.task == "facts":
        cases, _ = planted_cases(tokenizer, cases, task_templates(), seed=args.seed)
    start = time.time()
    rows = evaluate(model, tokenizer, chat_template(tokenizer), cases, variants(args.round), ("alone",), args.greedy_steps,
                    progress=lambda: print(".", end="", flush=True, file=sys.stderr))
    for row in rows:
        row["gap_closed"] = gap_closed(rows, row)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"cases": len(cases), "seed": args.seed, "dtype": "float32", "git_sha": sha, "seconds": time.time() - start,
              "command": "python " + " ".join(sys.argv), "torch_threads": torch.get_num_threads(), "settings": rows}
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print("\n| variant | KL mean | KL p90 | top-1 | greedy match len | gap closed | token-layers computed | task EM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r.get("variant") or r["policy"]
        print(f"| {name} | {r['kl_mean']:.4f} | {r['kl_p90']:.4f} | {r['top1']:.3f} | {r['greedy_match_len']:.2f} | "
              f"{r['gap_closed']:.2f} | {r['compute_fraction']:.3f} | {r.get('task_em', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
