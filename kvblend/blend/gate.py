"""The per-request quality gate: at a check layer, predict what leaving the unselected chunk tokens reused costs;
above the configured bound at the last check layer, restart the request at twice its ratio, above twice the
bound as a full prefill (the rows dropped at earlier checks cannot be resumed).

The predictor is the relative error of the question's attention output at the check layer when the rows the
selection drops keep their reused K/V instead of the fresh ones: ||O(mixed) - O(fresh)|| / ||O(fresh)||. It
needs one extra attention of the question's rows over the prompt per check layer (and a host sync on GPU).
The calibration against the KL of the blended answer is in benchmarks/RESULTS.md ("Per-request quality gate").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvblend.model.runner import attention

if TYPE_CHECKING:
    from kvblend.blend.config import BlendConfig


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
    reason: str | None = None  # set when the gate stops the request

    def as_dict(self) -> dict:
        reason = self.reason or "predicted error within the bound at every check layer"
        return {"bound": self.bound, "decision": self.decision, "reason": reason, "checks": self.checks}


class GateRestart(Exception):
    """The gate stopped a request at its last check layer: run it again with `config`; `report` is the gate's,
    `token_layers` what the stopped attempt computed (counted in the request's compute)."""

    def __init__(self, config: "BlendConfig", report: dict, token_layers: int) -> None:
        super().__init__(report["reason"])
        self.config, self.report, self.token_layers = config, report, token_layers
