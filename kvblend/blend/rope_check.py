"""Start-up self-check: does `rope_shift` reproduce direct rotation for this model's own rope config?"""

from __future__ import annotations

import torch

from kvblend.model.spec import ModelSpec
from kvblend.rope import UnsupportedRope, apply_rope, inv_freq, rope_shift

# fp32 angles at positions ~8k carry ~1e-4 relative error in both paths; a wrong rope config gives O(1).
TOLERANCE = 1e-3
MAX_CHECKED_POSITION = 8192


def check_rope_shift(spec: ModelSpec, num_tokens: int = 64, seed: int = 0) -> str | None:
    """None if shifting cached K is exact for this model, else the reason blending must stay off."""
    try:
        freq = inv_freq(spec.rope)
    except UnsupportedRope as exc:
        return str(exc)
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(num_tokens, spec.num_kv_heads, spec.head_dim, generator=g, dtype=torch.float64).float()
    limit = max(2, min(spec.max_position, MAX_CHECKED_POSITION))
    old = torch.randint(0, limit // 2, (num_tokens,), generator=g)
    new = torch.randint(0, limit, (num_tokens,), generator=g)
    shifted = rope_shift(apply_rope(raw, old, spec.rope, freq), new - old, spec.rope, freq)
    direct = apply_rope(raw, new, spec.rope, freq)
    err = ((shifted - direct).norm() / direct.norm()).item()
    if not err < TOLERANCE:
        return f"rope_shift differs from direct rotation by {err:.2e} (> {TOLERANCE:g}) for {spec.rope}"
    return None
