"""The per-request quality gate: at the first check layer, before the selection is fixed, predict what leaving the
unselected chunk tokens reused will cost, and above the configured bound raise the request's ratio in place (every
chunk row is still active there, so nothing computed is wasted).

The signals, read at the first check layer from the fresh Q/K/V and the reused K/V that layer already has:
the share of the question's attention on the chunk tokens the configured ratio would leave reused, that share
weighted by each token's relative K+V deviation, the question's attention on all chunk tokens, the chunks' mean
relative deviation, the unselected share of the selection scores, the share of the scores and of the question's
attention on the tokens a raise would add (ranked between the configured and the raised count), and the relative
change of the question's attention output if every chunk token kept its reused K/V. The calibration against the blended
answer's KL is in benchmarks/RESULTS.md ("Per-request gate, second design").
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
            "deviation": float(deviation.mean()),
            "unselected_mass": float(1.0 - scores[picked].sum() / total),
            "marginal_mass": float(scores[added].sum() / total),
            "marginal_attention": float(received[added].sum())}


@dataclass
class GateReport:
    """The gate's signals and its decision for the request (into the blend report)."""

    bound: float
    signals: dict[str, float] = field(default_factory=dict)
    decision: str = "pass"
    ratio: float | None = None
    reason: str = ""

    def as_dict(self) -> dict:
        return {"bound": self.bound, "decision": self.decision, "ratio": self.ratio, "reason": self.reason,
                "signals": {k: round(v, 6) for k, v in self.signals.items()}}


SIGNAL = "deviation"  # the signal the gate decides on (the best-ranked in the calibration)


def decide(report: GateReport, ratio: float) -> float:
    """The request's ratio from its signals: the configured one, or twice it (a full prefill at 1) above the bound;
    records the decision and its reason in `report`."""
    value = report.signals[SIGNAL]
    if value <= report.bound:
        report.decision, report.ratio = "pass", ratio
        report.reason = f"{SIGNAL} {value:.4f} <= bound {report.bound:g}"
        return ratio
    raised = min(1.0, 2 * ratio)
    report.decision, report.ratio = ("full_prefill" if raised >= 1.0 else "raised"), raised
    report.reason = (f"{SIGNAL} {value:.4f} > bound {report.bound:g}: ratio raised in place to {raised:g}"
                     + (" (a full prefill)" if raised >= 1.0 else ""))
    return raised
