"""Fidelity harness: how close blended KV comes to a full prefill of the same token ids.

Per case and setting: KL(full || blend) of the next-token distribution at every suffix token (teacher-forced),
top-1 agreement there, and greedy decoding of 32 tokens from each KV (exact match and matching-prefix length).
Cases with an answer (planted facts, kvblend.eval.tasks) are also scored on the generated answer: exact match
and token F1. Settings with the quality gate report how often it raised the ratio or fell back to full prefill,
and the mean of its layer-0 signal (kv_mismatch). `codec` stores the chunks' KV through a storage codec (what a tier
of that codec hands the blend back).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from kvblend.blend.config import DEFAULT_RATIO, BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.gate import DEFAULT_GATE_BOUND
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.blend.prompt import PromptTemplate
from kvblend.eval.tasks import answer_text, exact_match, token_f1
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import encode
from kvblend.rag.precompute import chunk_key, compute_chunk_kv, token_windows
from kvblend.retrieval.corpus import Document
from kvblend.store.key import ALONE, BEHIND_PREFIX
from kvblend.store.memory import MemoryTier
from kvblend.store.tiered import TieredStore

RATIOS = (0.0, 0.05, DEFAULT_RATIO, 0.3, 1.0)


@dataclass(frozen=True)
class Setting:
    """One row of the report: a policy at a ratio, with a variant name for selection experiments."""

    policy: str
    ratio: float
    config: BlendConfig
    variant: str = ""


def standard_settings(chunk_tokens: int, ratios: Sequence[float] = RATIOS,
                      gate_bounds: Sequence[float] = (DEFAULT_GATE_BOUND,),
                      gated_ratios: Sequence[float] = (DEFAULT_RATIO,), baselines: bool = True, gate_raise: float | None = None) -> list[Setting]:
    """full_reuse (r=0), full_prefill (r=1); at each ratio cacheblend (kvblend's default selection) without the
    quality gate (cacheblend_fixed) and with `baselines` the published CacheBlend selection, epic (k = ratio x
    chunk length) and random; at each of `gated_ratios` cacheblend with the gate at each of `gate_bounds` (full
    prefill above it) and, with `gate_raise`, the raise to twice the ratio above that."""
    settings = [Setting("full_reuse", 0.0, BlendConfig("full_reuse", 0.0)),
                Setting("full_prefill", 1.0, BlendConfig("full_prefill", 1.0))]
    for r in gated_ratios:
        for bound in gate_bounds:
            raised = "" if gate_raise is None else f", raise {gate_raise:g}"
            config = BlendConfig("cacheblend", r, gate_bound=bound, gate_raise=gate_raise)
            settings.append(Setting("cacheblend", r, config, variant=f"gate {bound:g}{raised}"))
    for r in ratios:
        settings.append(Setting("cacheblend_fixed", r, BlendConfig("cacheblend", r, gate_bound=None)))
        if baselines:
            settings.append(Setting("cacheblend_published", r, BlendConfig.published(r)))
            settings.append(Setting("epic", r, BlendConfig("epic", r, epic_tokens=round(r * chunk_tokens))))
            if 0.0 < r < 1.0:
                settings.append(Setting("random", r, BlendConfig("random", r)))
    return settings


@dataclass(frozen=True)
class CaseSpec:
    """Chunks, the question, where the chunks come from; for a task case the gold answer and its template."""

    chunks: tuple[tuple[int, ...], ...]
    question: str
    sources: tuple[str, ...]
    answer: str | None = None
    task: str = ""


def make_cases(tokenizer, docs: Sequence[Document], questions: Sequence[str], num_cases: int, chunk_tokens: int,
               chunks_per_case: tuple[int, int] = (4, 6), seed: int = 0) -> list[CaseSpec]:
    """Cases of several full-size chunks drawn from across the corpus, never two neighbours from one
    document, in random order, each with a question (from `questions`, else about a chunk's document)."""
    pool = []
    for d, doc in enumerate(docs):
        for w, ids in enumerate(token_windows(encode(tokenizer, doc.text), chunk_tokens)):
            if len(ids) == chunk_tokens:
                pool.append((d, w, tuple(ids)))
    lo, hi = chunks_per_case
    if len(pool) < 2 * hi:
        raise ValueError(f"corpus yields only {len(pool)} chunks of {chunk_tokens} tokens; need at least {2 * hi}")
    rng = random.Random(seed)
    cases = []
    for c in range(num_cases):
        n = rng.randint(lo, hi)
        picked: list[tuple[int, int, tuple[int, ...]]] = []
        for cand in rng.sample(pool, len(pool)):
            if all(not (cand[0] == p[0] and abs(cand[1] - p[1]) <= 1) for p in picked):
                picked.append(cand)
            if len(picked) == n:
                break
        rng.shuffle(picked)
        question = questions[c % len(questions)] if questions else (
            f"What does the documentation say about {docs[picked[0][0]].title or docs[picked[0][0]].source}?")
        cases.append(CaseSpec(tuple(p[2] for p in picked), question, tuple(f"{docs[p[0]].source}#{p[1]}" for p in picked)))
    return cases


def read_questions(path: str | Path) -> list[str]:
    """Questions from JSONL lines of the form {"question": "..."}."""
    questions = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)["question"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected a JSON object with a 'question' string ({exc})") from exc
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{path}:{n}: empty question")
        questions.append(q)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) of the softmax distributions, per row, in float64."""
    ref = torch.log_softmax(ref_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0.0)


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class SettingScores:
    kls: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    greedy_exact: list[bool] = field(default_factory=list)
    greedy_len: list[int] = field(default_factory=list)
    recompute_ratio: list[float] = field(default_factory=list)
    compute_fraction: list[float] = field(default_factory=list)
    task_em: dict[str, list[bool]] = field(default_factory=dict)
    task_f1: list[float] = field(default_factory=list)
    answers: list[tuple[str, str]] = field(default_factory=list)
    gate: list[str] = field(default_factory=list)
    kv_mismatch: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        kls = sorted(self.kls)
        out = {
            "kl_mean": sum(kls) / len(kls),
            "kl_p90": kls[min(len(kls) - 1, math.ceil(0.9 * len(kls)) - 1)],
            "top1": sum(self.top1) / len(self.top1),
            "greedy32_match": sum(self.greedy_exact) / len(self.greedy_exact),
            "greedy_match_len": sum(self.greedy_len) / len(self.greedy_len),
            "recompute_ratio": sum(self.recompute_ratio) / len(self.recompute_ratio),
            "compute_fraction": sum(self.compute_fraction) / len(self.compute_fraction),
        }
        if self.task_f1:
            em = [x for xs in self.task_em.values() for x in xs]
            out["task_em"] = sum(em) / len(em)
            out["task_f1"] = sum(self.task_f1) / len(self.task_f1)
            out["task_em_by_template"] = {k: sum(v) / len(v) for k, v in sorted(self.task_em.items())}
            out["answers"] = [{"gold": g, "answer": a} for g, a in self.answers]
        if self.gate:
            out["gate_raised"] = self.gate.count("raised") / len(self.gate)
            out["gate_full_prefill"] = self.gate.count("full_prefill") / len(self.gate)
        if self.kv_mismatch:
            out["kv_mismatch"] = sum(self.kv_mismatch) / len(self.kv_mismatch)
        return out


def stored_chunk_refs(model: LlamaModel, store: TieredStore, chunks: Sequence[Sequence[int]], tag: str,
                      prefix: list[int] | None = None, codec: str = "full") -> list[ChunkRef]:
    """References to `chunks` whose KV (computed alone, or behind `prefix`, through `codec`) is in `store`,
    computed once each."""
    refs = []
    for ids in chunks:
        key = chunk_key(model, ids, tag, prefix)
        if not store.contains(key):
            store.put(key, compute_chunk_kv(model, key, ids, prefix).encoded(codec).decoded())
        refs.append(ChunkRef(ids, key))
    return refs


def evaluate(model: LlamaModel, tokenizer, template: PromptTemplate, cases: Sequence[CaseSpec],
             settings: Sequence[Setting], contexts: Sequence[str] = (ALONE,), greedy_steps: int = 32,
             progress=None, codec: str = "full") -> list[dict]:
    """Run every case under every setting and chunk context; one summary dict per (context, setting)."""
    store = TieredStore([MemoryTier(64 << 30)])
    engine = BlendEngine(model, store)
    scores = {(ctx, i): SettingScores() for ctx in contexts for i in range(len(settings))}
    for case in cases:
        for ctx in contexts:
            prefix = list(template.prefix) if ctx == BEHIND_PREFIX else None
            refs = stored_chunk_refs(model, store, case.chunks, "fidelity", prefix, codec)
            layout = template.layout(tokenizer, refs, case.question)
            _score_case(model, tokenizer, engine, layout, case, settings, ctx, scores, greedy_steps)
        if progress:
            progress()
    rows = []
    for ctx in contexts:
        for i, s in enumerate(settings):
            row = {"policy": s.policy, "ratio": s.ratio, "context": ctx, **scores[(ctx, i)].summary()}
            if s.variant:
                row["variant"] = s.variant
            row["config"] = {k: v for k, v in asdict(s.config).items() if k != "seed"}
            rows.append(row)
    return rows


def _score_case(model, tokenizer, engine, layout: PromptLayout, case: CaseSpec, settings, ctx, scores,
                greedy_steps) -> None:
    suffix_rows = torch.arange(layout.suffix_start, layout.num_tokens)
    full = model.prefill(layout.token_ids(), logits_at=suffix_rows)
    full_greedy = model.greedy(full.k, full.v, full.logits[-1], greedy_steps)
    for i, setting in enumerate(settings):
        result = engine.blend(layout, setting.config, logits_at="suffix")
        s = scores[(ctx, i)]
        s.kls.extend(kl_per_token(full.logits, result.logits).tolist())
        s.top1.extend((full.logits.argmax(-1) == result.logits.argmax(-1)).tolist())
        tokens = model.greedy(result.k, result.v, result.logits[-1], greedy_steps)
        s.greedy_exact.append(tokens == full_greedy)
        s.greedy_len.append(matching_prefix(tokens, full_greedy))
        s.recompute_ratio.append(result.stats.recompute_ratio)
        s.compute_fraction.append(result.stats.compute_fraction)
        if case.answer is not None:
            answer = answer_text(tokenizer, tokens)
            s.task_em.setdefault(case.task, []).append(exact_match(answer, case.answer))
            s.task_f1.append(token_f1(answer, case.answer))
            s.answers.append((case.answer, answer))
        if result.stats.gate is not None:
            s.gate.append(result.stats.gate["decision"])
            if "kv_mismatch" in result.stats.gate["signals"]:
                s.kv_mismatch.append(result.stats.gate["signals"]["kv_mismatch"])


def gap_closed(rows: Sequence[dict], row: dict) -> float:
    """Fraction of the KL gap between full_reuse and full_prefill (same context) that a setting closes."""
    same = {r["policy"]: r for r in rows if r["context"] == row["context"] and r["policy"] in ("full_reuse", "full_prefill")}
    lo, hi = same["full_reuse"]["kl_mean"], same["full_prefill"]["kl_mean"]
    return (lo - row["kl_mean"]) / (lo - hi) if lo > hi else float("nan")


def plot(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """KL and greedy matching length vs recompute ratio, one line per policy (and context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("variant"):
            continue
        series.setdefault(f"{r['policy']} ({r['context']})", []).append(r)
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["ratio"])
        x = [p["ratio"] for p in pts]
        style = "o" if len(pts) == 1 else "o-"
        axes[0].plot(x, [p["kl_mean"] for p in pts], style, label=name)
        axes[1].plot(x, [p["greedy_match_len"] for p in pts], style, label=name)
    axes[0].set(xlabel="recompute ratio r", ylabel="mean KL(full || blend) over suffix tokens", yscale="symlog")
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[1].set(xlabel="recompute ratio r", ylabel="greedy 32: mean matching prefix length")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
