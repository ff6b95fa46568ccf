"""Which planted-fact templates SmolLM2 answers with a full prefill (kvblend.eval.tasks): every template and
phrasing on its own cases, full prefill only, greedy answer scored by exact match and token F1.
    python benchmarks/task_templates.py --per-phrasing 2 --json benchmarks/results/task_templates.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from kvblend.blend.layout import ChunkRef
from kvblend.blend.prompt import chat_template
from kvblend.eval.fidelity import make_cases
from kvblend.eval.tasks import TEMPLATES, answer_text, exact_match, planted_cases, token_f1
from kvblend.model.embedded import embedded_model_dir
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import load_tokenizer
from kvblend.rag.precompute import chunk_key
from kvblend.retrieval.corpus import pydoc_topics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-phrasing", type=int, default=2, help="cases per template phrasing")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--greedy-steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    start = time.time()
    model_dir = embedded_model_dir()
    model = LlamaModel.from_dir(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(tokenizer)
    n = args.per_phrasing * sum(len(t.questions) for t in TEMPLATES)
    base = make_cases(tokenizer, pydoc_topics(), [], n, 256, (args.chunks, args.chunks), seed=args.seed)
    cases, _ = planted_cases(tokenizer, base, seed=args.seed)
    rows = []
    for case in cases:
        layout = template.layout(tokenizer, [ChunkRef(c, chunk_key(model, c, "tasks")) for c in case.chunks],
                                 case.question)
        full = model.prefill(layout.token_ids(), logits_at=torch.tensor([layout.num_tokens - 1]))
        answer = answer_text(tokenizer, model.greedy(full.k, full.v, full.logits[-1], args.greedy_steps))
        rows.append({"task": case.task, "question": case.question, "gold": case.answer, "answer": answer,
                     "em": exact_match(answer, case.answer), "f1": token_f1(answer, case.answer)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    by_kind: dict[str, list[bool]] = {}
    for r in rows:
        by_kind.setdefault(r["task"], []).append(r["em"])
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"git_sha": sha, "seconds": time.time() - start, "command": "python " + " ".join(sys.argv),
              "em_by_template": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
              "em": sum(r["em"] for r in rows) / len(rows), "f1": sum(r["f1"] for r in rows) / len(rows), "cases": rows}
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps(report["em_by_template"], indent=1), report["em"], report["f1"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
