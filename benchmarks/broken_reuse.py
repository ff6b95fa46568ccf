"""Broken reuse vs ordinary reuse: does the quality gate's signal separate them? (SmolLM2, fp32, CPU)

Users of KV-reuse systems report output silently degraded by reused KV that does not belong to the prompt:
another request's KV under a key, KV of another model version or engine, positions not re-rotated, failed or
garbled stores (LMCache #4385, #4463, #4991; rtx6kpro #55; Rapid-MLX #2202). Per pydoc-topic case (the recipe of
benchmarks/quality_gate.py) this stores each kind of broken KV under the chunks' own keys, blends at r = 0.15 with
the gate measuring (bound inf: every signal recorded, never acted on), and records the signals beside KL(full
prefill || blend) and, for planted-fact cases, the greedy answer's exact match. Kinds:
  ordinary         the chunks' own KV, computed alone (the reference)
  bf16, fp16, fp8  the same KV rounded through bf16 / fp16 / fp8 e4m3 (a lower-precision tier: should pass)
  other_prefix     KV computed behind another system prompt and another chunk (another context, right positions)
  finetune_1pct    KV of the same architecture with every weight perturbed by 1% of its tensor's std (a new
  finetune_10pct   model version under an unchanged key), and by 10%
  other_model      KV of random weights of the same shapes (each tensor redrawn with its own mean and std)
  no_rope_shift    the chunks' KV left at the positions they were computed at (the rope shift skipped)
  wrong_text_one   one chunk's key holds another text's KV (the fact's chunk in a facts case; else the first)
  wrong_text_all   every chunk's key holds another text's KV
  duplicated       the first chunk retrieved twice (a natural case: a prompt of its own, right KV)
Natural hard layouts (short chunks, many chunks) are runs with other --chunk-tokens / --chunks.

    python benchmarks/broken_reuse.py measure --cases 6 --seed 14 --jsonl benchmarks/results/broken_reuse.jsonl
    python benchmarks/broken_reuse.py analyse --jsonl benchmarks/results/broken_reuse.jsonl \
        --ordinary benchmarks/results/gate_l1_calibration.jsonl,benchmarks/results/gate_l1_heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import fields, replace

import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.gate import DEFAULT_GATE_BOUND, FALLBACK_SIGNAL
from kvblend.blend.layout import ChunkRef
from kvblend.blend.prompt import chat_template
from kvblend.cpu import cpu_record
from kvblend.eval.fidelity import kl_per_token, make_cases
from kvblend.eval.tasks import answer_text, exact_match, planted_cases, task_templates
from kvblend.model.embedded import embedded_model_dir
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import encode, load_tokenizer
from kvblend.model.weights import load_weights
from kvblend.rag.precompute import chunk_key, compute_chunk_kv
from kvblend.retrieval.corpus import pydoc_topics, read_corpus
from kvblend.store.entry import ChunkKV
from kvblend.store.memory import MemoryTier
from kvblend.store.tiered import TieredStore

KINDS = ("ordinary", "bf16", "fp16", "fp8", "other_prefix", "finetune_1pct", "finetune_10pct", "other_model",
         "no_rope_shift", "wrong_text_one", "wrong_text_all", "duplicated")
RATIO = 0.15
ORDINARY = ("ordinary", "bf16", "fp16", "fp8", "finetune_1pct", "other_prefix", "duplicated")  # right KV: should pass
BROKEN = ("finetune_10pct", "other_model", "no_rope_shift", "wrong_text_one", "wrong_text_all")  # should fall back
OTHER_SYSTEM = "<|im_start|>system\nYou are a pirate. Answer every question in rhyme.<|im_end|>\n"


def perturbed_model(model_dir, model: LlamaModel, scale: float | None, seed: int) -> LlamaModel:
    """The same architecture with every weight tensor perturbed by `scale` x its std (None: redrawn at random
    with its own mean and std); tied tensors stay tied."""
    gen, done = torch.Generator().manual_seed(seed), {}

    def redraw(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in done:
            noise = torch.randn(t.shape, generator=gen) * (t.float().std() if t.numel() > 1 else t.float().abs())
            done[id(t)] = (t.float().mean() + noise if scale is None else t.float() + scale * noise).to(t.dtype)
        return done[id(t)]

    w = load_weights(model_dir, model.spec)
    layers = [replace(layer, **{f.name: redraw(getattr(layer, f.name)) for f in fields(layer)}) for layer in w.layers]
    weights = replace(w, embed=redraw(w.embed), layers=layers, norm=redraw(w.norm), lm_head=redraw(w.lm_head))
    return LlamaModel(model.spec, weights, model.ops)


def broken_entry(kind: str, model: LlamaModel, models: dict, key, ids, position: int, other_ids,
                 other_prefix: list[int]) -> ChunkKV:
    """The entry stored under `key` (chunk `ids`, placed at `position` in the prompt) for a broken kind."""
    if kind in ("bf16", "fp16", "fp8"):
        kv = compute_chunk_kv(model, key, ids)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[kind]
        return ChunkKV(key, kv.k.to(dtype).float(), kv.v.to(dtype).float(), kv.token_ids, kv.base_position)
    if kind == "other_prefix":
        return compute_chunk_kv(model, key, ids, other_prefix)
    if kind in models:
        return compute_chunk_kv(models[kind], key, ids)
    if kind == "no_rope_shift":
        kv = compute_chunk_kv(model, key, ids)
        return ChunkKV(key, kv.k, kv.v, kv.token_ids, position)  # claims the positions it is placed at
    if kind.startswith("wrong_text"):
        kv = compute_chunk_kv(model, key, other_ids)
        return ChunkKV(key, kv.k, kv.v, torch.tensor(list(ids), dtype=torch.int64), 0)
    raise ValueError(f"unknown kind {kind!r}")


def blend_row(engine, model, tokenizer, layout, full, full_greedy, case, steps: int) -> dict:
    result = engine.blend(layout, BlendConfig(ratio=RATIO, gate_bound=float("inf"), gate_calibration=True),
                          logits_at="suffix")
    row = {"kl": float(kl_per_token(full.logits, result.logits).mean()),
           "top1": float((full.logits.argmax(-1) == result.logits.argmax(-1)).float().mean()),
           "compute": result.stats.compute_fraction, "signals": result.stats.gate["signals"]}
    if case.answer is not None:
        tokens = model.greedy(result.k, result.v, result.logits[-1], steps)
        answer = answer_text(tokenizer, tokens)
        row.update(answer=answer, em=exact_match(answer, case.answer), greedy_same=tokens == full_greedy)
    return row


def measure(args) -> None:
    model_dir = embedded_model_dir()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LlamaModel.from_dir(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(tokenizer)
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; choose from {KINDS}")
    models = {}
    for kind, scale in (("finetune_1pct", 0.01), ("finetune_10pct", 0.1), ("other_model", None)):
        if kind in kinds:
            models[kind] = perturbed_model(model_dir, model, scale, seed=args.seed)
    lo, _, hi = args.chunks.partition("-")
    docs = pydoc_topics() if args.corpus == "pydoc" else read_corpus(args.corpus.split(","))
    cases = make_cases(tokenizer, docs, [], args.cases, args.chunk_tokens, (int(lo), int(hi or lo)), seed=args.seed)
    where = [0] * len(cases)
    if args.task == "facts":
        cases, facts = planted_cases(tokenizer, cases, task_templates(), seed=args.seed)
        where = [f.chunk for f in facts]
    # other texts of the same length, drawn from other cases of the corpus
    others = make_cases(tokenizer, docs, [], args.cases, args.chunk_tokens, (int(hi or lo), int(hi or lo)),
                        seed=args.seed + 1000)
    other_prefix = encode(tokenizer, OTHER_SYSTEM) + list(others[0].chunks[0][:64])
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    for n, case in enumerate(cases):
        if n < args.skip:
            continue
        full_layout = template.layout(tokenizer, [ChunkRef(ids, chunk_key(model, ids)) for ids in case.chunks],
                                      case.question)  # the token ids every kind shares
        suffix_rows = torch.arange(full_layout.suffix_start, full_layout.num_tokens)
        full = model.prefill(full_layout.token_ids(), logits_at=suffix_rows)
        full_greedy = model.greedy(full.k, full.v, full.logits[-1], args.greedy_steps) if case.answer else None
        positions = []
        pos = len(template.prefix)
        for ids in case.chunks:
            positions.append(pos)
            pos += len(ids)
        for kind in kinds:
            start = time.time()
            store = TieredStore([MemoryTier(8 << 30)])
            engine = BlendEngine(model, store)
            chunks = list(case.chunks) + ([case.chunks[0]] if kind == "duplicated" else [])
            refs = []
            for c, ids in enumerate(chunks):
                key = chunk_key(model, ids, f"broken-{kind}")
                broken = kind == "wrong_text_all" or (kind == "wrong_text_one" and c == where[n]) or (
                    kind not in ("ordinary", "duplicated", "wrong_text_one", "wrong_text_all"))
                if not store.contains(key):
                    entry = broken_entry(kind, model, models, key, ids, positions[c], others[n].chunks[c % len(
                        others[n].chunks)], other_prefix) if broken else compute_chunk_kv(model, key, ids)
                    store.put(key, entry)
                refs.append(ChunkRef(ids, key))
            layout = template.layout(tokenizer, refs, case.question)
            if kind == "duplicated":
                rows = torch.arange(layout.suffix_start, layout.num_tokens)
                ref_full = model.prefill(layout.token_ids(), logits_at=rows)
                ref_greedy = model.greedy(ref_full.k, ref_full.v, ref_full.logits[-1], args.greedy_steps) \
                    if case.answer else None
            else:
                ref_full, ref_greedy = full, full_greedy
            row = {"case": n, "seed": args.seed, "corpus": args.corpus, "kind": kind, "chunk_tokens": args.chunk_tokens,
                   "chunks": len(chunks), "tokens": layout.num_tokens, "task": args.task, "git_sha": sha}
            if case.answer is not None:
                row.update(gold=case.answer, fact_chunk=where[n])
                if kind == "ordinary":
                    row["full_answer"] = answer_text(tokenizer, full_greedy)
                    row["full_em"] = exact_match(row["full_answer"], case.answer)
            row.update(blend_row(engine, model, tokenizer, layout, ref_full, ref_greedy, case, args.greedy_steps))
            row["seconds"] = round(time.time() - start, 1)
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "signals"} | {s: row["signals"][s] for s in ("deviation", FALLBACK_SIGNAL)}),
                  flush=True)


def read_rows(paths: str) -> list[dict]:
    rows = []
    for path in paths.split(","):
        if path:
            with open(path) as fh:
                rows += [json.loads(line) for line in fh if line.startswith("{")]
    return rows


def setting(r: dict) -> str:
    """The case family of a row: corpus, chunk size, task."""
    corpus = "pydoc" if r.get("corpus", "pydoc") == "pydoc" else "licenses+README"
    return f"{corpus}, {r['chunk_tokens']}-token chunks" + (", facts" if r["task"] == "facts" else "")


def analyse(args) -> dict:
    """Per kind and case family: the signal's range, the blend's KL without the gate and with it (a fallback is
    a full prefill: KL 0, full prefill's answer), task EM; the false-positive rate on ordinary cases."""
    rows, ordinary = read_rows(args.jsonl), read_rows(args.ordinary)
    bound = args.bound
    full_em = {(setting(r), r["case"]): r["full_em"] for r in rows if "full_em" in r}
    report = {"machine": cpu_record(), "git_shas": sorted({r["git_sha"] for r in rows}), "bound": bound, "kinds": []}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], setting(r)), []).append(r)
    print("| kind | cases | n | deviation min-max | fired | KL no gate (mean / max) | KL with gate | EM no gate | EM with gate |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, family), rs in sorted(groups.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
        dev = [r["signals"][FALLBACK_SIGNAL] for r in rs]
        fired = [d > bound for d in dev]
        kl = [r["kl"] for r in rs]
        entry = {"kind": kind, "cases": family, "n": len(rs), "deviation_min": min(dev), "deviation_max": max(dev),
                 "fired": sum(fired) / len(rs), "kl_mean": sum(kl) / len(kl), "kl_max": max(kl),
                 "kl_mean_gated": sum(0.0 if f else k for k, f in zip(kl, fired)) / len(kl)}
        em = gated_em = ""
        if "em" in rs[0]:
            entry["em"] = sum(r["em"] for r in rs) / len(rs)
            entry["em_gated"] = sum(full_em[(family, r["case"])] if f else r["em"] for r, f in zip(rs, fired)) / len(rs)
            em, gated_em = f"{entry['em']:.2f}", f"{entry['em_gated']:.2f}"
        report["kinds"].append(entry)
        print(f"| {kind} | {family} | {len(rs)} | {min(dev):.2g} - {max(dev):.2g} | {sum(fired)}/{len(rs)} | "
              f"{entry['kl_mean']:.4f} / {entry['kl_max']:.4f} | {entry['kl_mean_gated']:.4f} | {em} | {gated_em} |")
    calib = [c["signals"][FALLBACK_SIGNAL] for c in ordinary]
    own = [r["signals"][FALLBACK_SIGNAL] for r in rows if r["kind"] in ORDINARY]
    report["ordinary"] = {"calibration_n": len(calib), "calibration_max": max(calib, default=None),
                          "calibration_fired": sum(d > bound for d in calib),
                          "here_n": len(own), "here_max": max(own, default=None), "here_fired": sum(d > bound for d in own)}
    if args.earlier:  # the same cases' KL at r = 0.15 from the gate's earlier calibration (ungated there)
        earlier = {(c["seed"], c["case"]): c["kl_r0.15"] for c in read_rows(args.earlier)}
        diffs = [abs(c["kl"] - earlier[(c["seed"], c["case"])]) for c in ordinary if (c["seed"], c["case"]) in earlier]
        report["ordinary"].update(kl_compared=len(diffs), kl_max_abs_diff=max(diffs, default=None))
    broken = [r["signals"][FALLBACK_SIGNAL] for r in rows if r["kind"] in BROKEN]
    report["broken"] = {"n": len(broken), "min": min(broken, default=None), "fired": sum(d > bound for d in broken)}
    print(json.dumps({k: report[k] for k in ("ordinary", "broken")}))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["measure", "analyse"])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--skip", type=int, default=0, help="measure: start at this case")
    parser.add_argument("--corpus", default="pydoc", help="pydoc, or comma-separated files and directories")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--chunks", default="3-5", help="chunks per case, N or LO-HI")
    parser.add_argument("--kinds", default=None, help=f"comma-separated, of {KINDS} (default: all)")
    parser.add_argument("--task", choices=["none", "facts"], default="none")
    parser.add_argument("--greedy-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--jsonl", required=True, help="measure: appended per case and kind; analyse: read (comma-separated)")
    parser.add_argument("--ordinary", default="", help="analyse: JSONL files of ordinary cases (measure --kinds ordinary)")
    parser.add_argument("--earlier", default="", help="analyse: quality_gate.py calibrate JSONL of the same cases")
    parser.add_argument("--bound", type=float, default=DEFAULT_GATE_BOUND,
                        help="analyse: the fallback bound replayed (a fallback is a full prefill, exactly: the tests)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.mode == "measure":
        measure(args)
        return 0
    report = analyse(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
