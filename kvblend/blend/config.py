"""BlendConfig: which tokens of the cached chunks get recomputed, and how many."""

from __future__ import annotations

from dataclasses import dataclass

from kvblend.blend.gate import DEFAULT_GATE_BOUND, check_bound

POLICIES = ("cacheblend", "epic", "full_reuse", "full_prefill", "random")
DEFAULT_POLICY = "cacheblend"
DEFAULT_RATIO = 0.15
DEVIATIONS = ("k", "v", "kv", "none")
WEIGHTINGS = ("check", "question_pass", "both")


@dataclass(frozen=True)
class BlendConfig:
    """Selection policy and budget.

    cacheblend: all chunk tokens are recomputed up to the first check layer; at each check layer the tokens
      whose fresh KV deviates most from the reused KV are kept, the candidate fraction shrinking along
      `schedule` (gradual filtering) down to `ratio`; only they are recomputed in later layers. Without an
      explicit schedule the first check keeps min(1, 2 * ratio), shrinking linearly to `ratio` at the last.
      The defaults (checks at layers 1 and 3, attention-weighted K+V deviation) are the best of the selection
      experiments in benchmarks/HISTORY.md; `published()` is the CacheBlend paper's (layer 1, K+V deviation).
      `deviation` scores tokens by K, V or both ("kv": each normalised by its mean), or not at all ("none");
      `attention_weighted` multiplies that by the attention the question's tokens pay each token at the
      check layer (with "none": selection by that attention alone). `weighting` says where that attention is
      read: "check" at the check layer itself; "question_pass" from a first pass of the prompt's own rows
      (prefix, question) through every layer over the reused chunk KV, the question's attention to each chunk
      row averaged over all layers (ProphetKV's query-driven first stage; costs those rows' token-layers and a
      second read of the chunk KV from the store); "both" their product.
      `head_tokens` > 0 always keeps the first tokens of every chunk (EPIC's sinks) inside the same budget.
      The per-request quality gate (kvblend.blend.gate), in place: where the reused KV at layer 0 does not match
      the fresh KV of the same tokens (kvblend.blend.gate.FALLBACK_SIGNAL above `gate_bound`; on by default,
      None: off) the request becomes a full prefill; at the first check layer, before any row is dropped, above
      `gate_raise` on the chunks' mean deviation (None by default; kvblend.blend.gate.RAISE_BOUND is the
      calibrated opt-in) its ratio is doubled. `gate_calibration` also records the calibration's signals at the
      first check layer (costs two fp32 attention passes). The blend report says what the gate decided and why.
    epic: the first `epic_tokens` tokens of every chunk are recomputed in every layer.
    random: like cacheblend but the kept tokens are drawn at random (a control for the selection).
    full_reuse / full_prefill: nothing / everything recomputed — the two ends of the same engine.
    """

    policy: str = DEFAULT_POLICY
    ratio: float = DEFAULT_RATIO
    check_layers: tuple[int, ...] = (1, 3)
    schedule: tuple[float, ...] | None = None
    deviation: str = "kv"
    attention_weighted: bool = True
    weighting: str = "check"
    epic_tokens: int = 32
    head_tokens: int = 0
    seed: int = 0
    gate_bound: float | None = DEFAULT_GATE_BOUND
    gate_raise: float | None = None
    gate_calibration: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown blend policy {self.policy!r}; choose one of {POLICIES}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"recompute ratio must be in [0, 1], got {self.ratio}")
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.deviation == "none" and self.policy == "cacheblend" and not self.attention_weighted:
            raise ValueError("deviation 'none' selects by attention: set attention_weighted=True")
        if self.epic_tokens < 0 or self.head_tokens < 0:
            raise ValueError(f"epic_tokens and head_tokens must be >= 0, got {self.epic_tokens}, {self.head_tokens}")
        check_bound("gate_bound", self.gate_bound)
        check_bound("gate_raise", self.gate_raise)
        if not self.check_layers or list(self.check_layers) != sorted(set(self.check_layers)) or self.check_layers[0] < 0:
            raise ValueError(f"check_layers must be distinct ascending layer indices, got {self.check_layers}")
        schedule = self.ratios()
        if len(schedule) != len(self.check_layers):
            raise ValueError(f"schedule {schedule} needs one ratio per check layer {self.check_layers}")
        if any(b > a for a, b in zip(schedule, schedule[1:])) or schedule[-1] != self.ratio:
            raise ValueError(f"schedule {schedule} must shrink monotonically and end at ratio {self.ratio}")
        if any(not 0.0 <= r <= 1.0 for r in schedule):
            raise ValueError(f"schedule ratios must be in [0, 1], got {schedule}")

    @classmethod
    def published(cls, ratio: float = DEFAULT_RATIO) -> "BlendConfig":
        """CacheBlend as published: layers 0-1 recomputed, top-ratio by K+V deviation at layer 1, kept after;
        no quality gate."""
        return cls("cacheblend", ratio, check_layers=(1,), attention_weighted=False, gate_bound=None)

    @property
    def gated(self) -> bool:
        """Whether the quality gate reads its signal (either bound set)."""
        return self.gate_bound is not None or self.gate_raise is not None

    def ratios(self) -> tuple[float, ...]:
        """Candidate fraction kept at each check layer (the last one is `ratio`)."""
        if self.schedule is not None:
            return self.schedule
        n, first = len(self.check_layers), min(1.0, 2 * self.ratio)
        if n == 1:
            return (self.ratio,)
        return tuple(first + (self.ratio - first) * i / (n - 1) for i in range(n))

    @property
    def selects(self) -> bool:
        """Whether the policy selects tokens at check layers (cacheblend, random)."""
        return self.policy in ("cacheblend", "random")
