"""The per-request quality gate. Two probes of what the blend already has, each deciding in place (no computed row
is wasted):

- at layer 0, where a token's K/V depends only on the token, its position and the model, the fresh K/V of every
  chunk token against its reused K/V: right KV matches up to rounding, KV that does not belong to the prompt
  (another text's or another model's KV under the key, positions not re-rotated) does not. Above `gate_bound` (on
  by default at DEFAULT_GATE_BOUND) the request becomes a full prefill: every row simply stays active.
- at the first check layer, the chunks' mean relative K+V deviation: above `gate_raise` (opt-in, calibrated at
  RAISE_BOUND) the request's ratio is doubled before any row is dropped.

Serving computes only the signals that decide (one host read each). Calibration (`gate_calibration`) also records,
at the first check layer: the share of the question's attention on the chunk tokens the configured ratio would
leave reused, that share weighted by each token's relative deviation, the question's attention on all chunk
tokens, the unselected share of the selection scores, the share of the scores and of the question's attention on
the tokens a raise would add, and the relative change of the question's attention output if every chunk token kept
its reused K/V. The measurements behind both bounds are in benchmarks/HISTORY.md ("The gate on by default: a
fallback for broken reuse" for the fallback, "Per-request gate, second design" for the raise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvblend.model.runner import attention
from kvblend.triton_kernels import kv_deviation

FALLBACK_SIGNAL = "kv_mismatch"  # the fallback's signal (kv_mismatch, at layer 0)
RAISE_SIGNAL = "deviation"  # the raise's (mean_deviation, at the first check layer: the best-ranked in its calibration)
# Above it the reused KV is not this prompt's: a full prefill. Right KV stays far below it, broken reuse lies above
# it: benchmarks/HISTORY.md, "The gate on by default: a fallback for broken reuse".
DEFAULT_GATE_BOUND = 0.01
# The calibrated bound of the opt-in raise to twice the ratio ("Per-request gate, second design"): it raises about a
# third of ordinary requests and ties a fixed ratio at equal compute, so it is off unless asked for.
RAISE_BOUND = 0.0104


def relative_deviation(k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor,
                       heads_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per token, ||dK||^2 / mean ||K||^2 + ||dV||^2 / mean ||V||^2 over the fresh K/V [tokens, heads, dim]: a
    deviation comparable across requests (the selection's own scores are normalised per request). `heads_sum`
    completes the per-token sums over heads a tensor-parallel rank took over its own (one all-reduce)."""
    dev_k, dev_v = kv_deviation(k_new, v_new, k_old, v_old)
    parts = torch.stack((dev_k, dev_v, k_new.float().square().sum(dim=(1, 2)), v_new.float().square().sum(dim=(1, 2))))
    if heads_sum is not None:
        parts = heads_sum(parts)
    dev_k, dev_v, norm_k, norm_v = parts
    return dev_k / norm_k.mean().clamp_min(1e-30) + dev_v / norm_v.mean().clamp_min(1e-30)


def reuse_error(q: torch.Tensor, q_pos: torch.Tensor, fresh_k: torch.Tensor, fresh_v: torch.Tensor,
                chunk_rows: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor, k_pos: torch.Tensor) -> float:
    """Relative Frobenius error of the attention output of queries `q` when the rows `chunk_rows` hold their
    reused K/V (`old_*`, one row each) instead of the fresh ones: all in fp32."""
    fresh_k, fresh_v = fresh_k.float(), fresh_v.float()
    ref = attention(q.float(), q_pos, fresh_k, fresh_v, k_pos)
    mixed_k, mixed_v = fresh_k.clone(), fresh_v.clone()
    mixed_k[chunk_rows], mixed_v[chunk_rows] = old_k.float(), old_v.float()
    out = attention(q.float(), q_pos, mixed_k, mixed_v, k_pos)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def kv_mismatch(deviation: torch.Tensor, lengths: Sequence[int]) -> float:
    """FALLBACK_SIGNAL from the chunk tokens' relative deviation at layer 0 (`lengths`: tokens per chunk, in
    order): the largest of the chunks' mean deviations, so one wrong chunk among many shows whole. One host read."""
    return float(torch.stack([d.mean() for d in deviation.split(list(lengths))]).max())


def mean_deviation(deviation: torch.Tensor) -> dict[str, float]:
    """RAISE_SIGNAL: the chunk tokens' mean relative deviation at the first check layer."""
    return {RAISE_SIGNAL: float(deviation.mean())}


def gate_signals(received: torch.Tensor, deviation: torch.Tensor, scores: torch.Tensor, picked: torch.Tensor,
                 extended: torch.Tensor) -> dict[str, float]:
    """The calibration's signals at the first check layer. `received` [chunk tokens]: the question's attention on
    each chunk token (a share of all its attention); `deviation`: their relative deviation; `scores`: the
    selection's scores; `picked`: indices of the tokens the configured ratio keeps, `extended` those the raised
    ratio would."""
    reused = torch.ones_like(received, dtype=torch.bool)
    reused[picked] = False
    added = torch.zeros_like(reused)
    added[extended] = True
    added[picked] = False
    total = scores.sum().clamp_min(1e-30)
    return {"reused_attention": float(received[reused].sum()),
            "reused_deviation_attention": float((received * deviation)[reused].sum()),
            "chunk_attention": float(received.sum()),
            **mean_deviation(deviation),
            "unselected_mass": float(1.0 - scores[picked].sum() / total),
            "marginal_mass": float(scores[added].sum() / total),
            "marginal_attention": float(received[added].sum())}


def check_bound(name: str, value: float | None) -> None:
    """A gate bound is a number > 0 (inf: measure, never act) or None (off)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"{name} must be a number > 0 or None (off), got {value!r}")


@dataclass
class GateReport:
    """The gate's bounds, signals and decision for the request (into the blend report)."""

    bound: float | None
    raise_bound: float | None = None
    signals: dict[str, float] = field(default_factory=dict)
    decision: str = "pass"
    ratio: float | None = None
    reason: str = ""

    def as_dict(self) -> dict:
        return {"bound": self.bound, "raise_bound": self.raise_bound, "decision": self.decision, "ratio": self.ratio,
                "reason": self.reason, "signals": {k: float(f"{v:.4g}") for k, v in self.signals.items()}}


def fall_back(report: GateReport, mismatch: float) -> bool:
    """Whether the request falls back to a full prefill, from its FALLBACK_SIGNAL; records it, the decision and
    the reason in `report`."""
    report.signals[FALLBACK_SIGNAL] = mismatch
    if report.bound is None or mismatch <= report.bound:
        report.reason = f"{FALLBACK_SIGNAL} {mismatch:.3g} <= bound {report.bound:g}" if report.bound is not None else ""
        return False
    report.decision, report.ratio = "full_prefill", 1.0
    report.reason = f"{FALLBACK_SIGNAL} {mismatch:.3g} > bound {report.bound:g}: the reused KV is not this prompt's, full prefill"
    return True


def decide(report: GateReport, ratio: float) -> float:
    """The request's ratio from its RAISE_SIGNAL: twice the configured one above the raise bound (a full prefill
    at 1), else the configured one; records the decision and its reason in `report`."""
    mean = report.signals[RAISE_SIGNAL]
    if report.raise_bound is None or mean <= report.raise_bound:
        within = "" if report.raise_bound is None else f"{RAISE_SIGNAL} {mean:.4f} <= raise bound {report.raise_bound:g}"
        report.reason = ", ".join(r for r in (report.reason, within) if r)
        return ratio
    raised = min(1.0, 2 * ratio)
    report.decision, report.ratio = ("full_prefill" if raised >= 1.0 else "raised"), raised
    why = (f"{RAISE_SIGNAL} {mean:.4f} > raise bound {report.raise_bound:g}: ratio raised in place to {raised:g}"
           + (" (a full prefill)" if raised >= 1.0 else ""))
    report.reason = ", ".join(r for r in (report.reason, why) if r)
    return raised
