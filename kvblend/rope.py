"""Rotary position embedding: RopeSpec, frequencies per scaling type, rotation of Q/K, and `rope_shift`.

A leaf module (torch only) that both kvblend.model and kvblend.triton_kernels import.

Every supported scaling keeps a fixed frequency per dimension pair, so moving K from position p to p + d
is the pure rotation by d. Types whose frequencies depend on the sequence (dynamic NTK) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ROPE_STYLES = ("neox", "gptj")
SHIFTABLE_SCALING = ("default", "linear", "llama3")


class UnsupportedRope(ValueError):
    """The rope configuration cannot be reproduced (or shifted) exactly."""


def check_rope_style(style: str) -> None:
    """Refuse a rotation style other than neox (halves) or gptj (interleaved pairs)."""
    if style not in ROPE_STYLES:
        raise ValueError(f"unknown rope style {style!r}; expected one of {', '.join(ROPE_STYLES)}")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; `scaling_type` is 'default', 'linear', 'llama3', or another HF rope_type."""

    theta: float
    rotary_dim: int
    style: str = "neox"
    scaling_type: str = "default"
    scaling: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        check_rope_style(self.style)


def inv_freq(rope: RopeSpec) -> torch.Tensor:
    """Inverse frequency per rotary pair, float32, with the configured scaling applied."""
    exponents = torch.arange(0, rope.rotary_dim, 2, dtype=torch.float64) / rope.rotary_dim
    freq = 1.0 / (rope.theta**exponents)
    kind = rope.scaling_type
    if kind == "default":
        pass
    elif kind == "linear":
        freq = freq / float(rope.scaling["factor"])
    elif kind == "llama3":
        freq = _llama3_scale(freq, rope.scaling)
    else:
        raise UnsupportedRope(
            f"rope scaling {kind!r} cannot be shifted exactly (supported: {', '.join(SHIFTABLE_SCALING)}); "
            "its frequencies depend on the sequence or carry extra scaling, so cached K cannot be re-rotated"
        )
    return freq.to(torch.float32)


def _llama3_scale(freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by factor, a smooth ramp between."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def cos_sin(freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, float32, shape [tokens, rotary_dim / 2]."""
    angles = positions.to(torch.float32)[:, None] * freq.to(positions.device)[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] dims of x [tokens, heads, head_dim] by the given angles, in x's dtype."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if style == "neox":
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: RopeSpec, freq: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE at absolute positions, as HF models apply it to Q and K (cos/sin rounded to x's dtype)."""
    freq = inv_freq(rope) if freq is None else freq
    cos, sin = cos_sin(freq, positions)
    return rotate(x, cos, sin, rope.style)


def rope_shift(k: torch.Tensor, delta: torch.Tensor | int, rope: RopeSpec, freq: torch.Tensor | None = None) -> torch.Tensor:
    """Move K computed at positions p to p + delta: a pure rotation by delta (per token or one for all).

    The rotation runs in fp32 and rounds once, so a shifted bf16 K carries a single rounding error.
    """
    if not torch.is_tensor(delta):
        delta = torch.full((k.shape[0],), int(delta), dtype=torch.int64, device=k.device)
    elif delta.dim() == 0:
        delta = delta.expand(k.shape[0])
    freq = inv_freq(rope) if freq is None else freq
    cos, sin = cos_sin(freq, delta)
    return rotate(k.float(), cos, sin, rope.style).to(k.dtype)
