"""The per-request quality gate: at the first check layer, before the selection is fixed, one signal says how far
the reused chunk KV is from the KV this prompt computes for the same tokens (the chunks' mean relative K+V
deviation), and the request's ratio follows from it (every chunk row is still active there, so a raise wastes
nothing computed):

- above `gate_bound` (on by default at DEFAULT_GATE_BOUND) the reused KV does not belong to this prompt (another
  text's or another model's KV under the key, positions not re-rotated): the request falls back to a full prefill;
- above `gate_raise` (opt-in, calibrated at RAISE_BOUND) its ratio is doubled;
- else it passes at its ratio.

Serving computes that one signal (one host read). Calibration (`gate_calibration`) also records the others: the
share of the question's attention on the chunk tokens the configured ratio would leave reused, that share weighted
by each token's relative deviation, the question's attention on all chunk tokens, the unselected share of the
selection scores, the share of the scores and of the question's attention on the tokens a raise would add, and
the relative change of the question's attention output if every chunk token kept its reused K/V. The
measurements behind both bounds are in benchmarks/RESULTS.md ("Per-request gate, second design" for the raise,
"The gate on by default: broken reuse" for the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvblend.model.runner import attention
from kvblend.triton_kernels import kv_deviation


def relative_deviation(k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
    """Per token, ||dK||^2 / mean ||K||^2 + ||dV||^2 / mean ||V||^2 over the fresh K/V [tokens, heads, dim]: a
    deviation comparable across requests (the selection's own scores are normalised per request)."""
    dev_k, dev_v = kv_deviation(k_new, v_new, k_old, v_old)
    norm_k = k_new.float().square().sum(dim=(1, 2)).mean().clamp_min(1e-30)
    norm_v = v_new.float().square().sum(dim=(1, 2)).mean().clamp_min(1e-30)
    return dev_k / norm_k + dev_v / norm_v


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


def decision_signal(deviation: torch.Tensor) -> dict[str, float]:
    """The signal the gate decides on (SIGNAL), from the chunk tokens' relative deviation: their mean."""
    return {"deviation": float(deviation.mean())}


def gate_signals(received: torch.Tensor, deviation: torch.Tensor, scores: torch.Tensor, picked: torch.Tensor,
                 extended: torch.Tensor) -> dict[str, float]:
    """The gate's signals for one request. `received` [chunk tokens]: the question's attention on each chunk
    token (a share of all its attention); `deviation`: their relative deviation; `scores`: the selection's scores;
    `picked`: indices of the tokens the configured ratio keeps, `extended` those the raised ratio would."""
    reused = torch.ones_like(received, dtype=torch.bool)
    reused[picked] = False
    added = torch.zeros_like(reused)
    added[extended] = True
    added[picked] = False
    total = scores.sum().clamp_min(1e-30)
    return {"reused_attention": float(received[reused].sum()),
            "reused_deviation_attention": float((received * deviation)[reused].sum()),
            "chunk_attention": float(received.sum()),
            **decision_signal(deviation),
            "unselected_mass": float(1.0 - scores[picked].sum() / total),
            "marginal_mass": float(scores[added].sum() / total),
            "marginal_attention": float(received[added].sum())}


SIGNAL = "deviation"  # the signal the gate decides on (the best-ranked in the calibration)
# Above it the reused KV is not this prompt's: a full prefill. Ordinary reuse stays far below it (max 0.0137 over
# 64 pydoc-topic cases); broken reuse lies above it: benchmarks/RESULTS.md, "The gate on by default".
DEFAULT_GATE_BOUND = 0.03
# The calibrated bound of the opt-in raise to twice the ratio ("Per-request gate, second design"): it raises about a
# third of ordinary requests and ties a fixed ratio at equal compute, so it is off unless asked for.
RAISE_BOUND = 0.0104


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
                "reason": self.reason, "signals": {k: round(v, 6) for k, v in self.signals.items()}}


def decide(report: GateReport, ratio: float) -> float:
    """The request's ratio from its signal: 1 (a full prefill) above the bound, twice the configured ratio above
    the raise bound, else the configured one; records the decision and its reason in `report`."""
    value = report.signals[SIGNAL]
    if report.bound is not None and value > report.bound:
        report.decision, report.ratio = "full_prefill", 1.0
        report.reason = (f"{SIGNAL} {value:.4f} > bound {report.bound:g}: the reused KV is not this prompt's, "
                         "full prefill")
        return 1.0
    if report.raise_bound is not None and value > report.raise_bound:
        raised = min(1.0, 2 * ratio)
        report.decision, report.ratio = ("full_prefill" if raised >= 1.0 else "raised"), raised
        report.reason = (f"{SIGNAL} {value:.4f} > raise bound {report.raise_bound:g}: ratio raised in place to "
                         f"{raised:g}" + (" (a full prefill)" if raised >= 1.0 else ""))
        return raised
    report.decision, report.ratio = "pass", ratio
    report.reason = f"{SIGNAL} {value:.4f} <= " + (f"bound {report.bound:g}" if report.raise_bound is None else
                                                    f"raise bound {report.raise_bound:g}")
    return ratio
