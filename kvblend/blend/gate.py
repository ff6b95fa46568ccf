"""The per-request quality gate: at a check layer, predict what leaving the unselected chunk tokens reused costs,
and keep more of them (up to all: full prefill) when the prediction exceeds the configured bound.

The predictor is the relative error of the question's attention output at the check layer when the rows the
selection drops keep their reused K/V instead of the fresh ones: ||O(mixed) - O(fresh)|| / ||O(fresh)||. It
needs one extra attention of the question's rows over the prompt per candidate count (a host sync on GPU).
The calibration against the KL of the blended answer is in benchmarks/RESULTS.md ("Per-request quality gate").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvblend.model.runner import attention


def question_attention_error(q: torch.Tensor, q_pos: torch.Tensor, fresh_k: torch.Tensor, fresh_v: torch.Tensor,
                             old_k: torch.Tensor, old_v: torch.Tensor, dropped: torch.Tensor,
                             k_pos: torch.Tensor) -> float:
    """Relative Frobenius error of the attention output of queries `q` when the key rows `dropped` hold their
    reused K/V (`old_*`) instead of the fresh ones: all in fp32."""
    q, fresh_k, fresh_v = q.float(), fresh_k.float(), fresh_v.float()
    ref = attention(q, q_pos, fresh_k, fresh_v, k_pos)
    mixed_k, mixed_v = fresh_k.clone(), fresh_v.clone()
    mixed_k[dropped], mixed_v[dropped] = old_k[dropped].float(), old_v[dropped].float()
    out = attention(q, q_pos, mixed_k, mixed_v, k_pos)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def unselected_mass(scores: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of the selection scores' total held by the tokens not kept (0: the kept tokens hold it all)."""
    total = scores.sum().clamp_min(1e-30)
    return float(1.0 - scores[kept].sum() / total)


@dataclass
class GateReport:
    """The gate's signals at each check layer and its decision for the request (into the blend report)."""

    bound: float
    checks: list[dict] = field(default_factory=list)
    decision: str = "pass"
    reason: str | None = None  # set by the first check layer that keeps more than planned

    def as_dict(self) -> dict:
        reason = self.reason or "predicted error within the bound at every check layer"
        return {"bound": self.bound, "decision": self.decision, "reason": reason, "checks": self.checks}
