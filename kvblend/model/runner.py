"""A small torch runner for Llama-family decoders, exposed as the per-layer steps the blend engine composes.

It is the numerical reference for the blend engine and the Triton kernels, and the precompute path.
Shapes: hidden [tokens, hidden]; q [tokens, heads, head_dim]; k, v [tokens, kv_heads, head_dim].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvblend.model.rope import apply_rope, inv_freq
from kvblend.model.spec import ModelSpec, load_spec
from kvblend.model.weights import LlamaWeights, load_weights


@dataclass
class Prefill:
    """Per-layer K (after RoPE) and V, stacked [layers, tokens, kv_heads, head_dim], and the requested logits."""

    k: torch.Tensor
    v: torch.Tensor
    logits: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back, then scaled (as HF Llama does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def attention(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Attention of queries over keys, causal by absolute position (key pos <= query pos), GQA; [tq, heads*dim]."""
    mask = k_pos[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask[None, None], enable_gqa=True
    )
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


class LlamaModel:
    """Weights plus the per-layer steps: embed, qkv (norm + projection + RoPE), attend, finish_layer, logits."""

    def __init__(self, spec: ModelSpec, weights: LlamaWeights) -> None:
        self.spec = spec
        self.weights = weights
        self.device = weights.embed.device
        self.freq = inv_freq(spec.rope).to(self.device)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, dtype: str | None = None, device: str = "cpu") -> "LlamaModel":
        spec = load_spec(model_dir, dtype=dtype)
        return cls(spec, load_weights(model_dir, spec, device))

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.device), self.weights.embed)

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, fused QKV projection and RoPE at `positions`: q, k (rotated) and v."""
        s, w = self.spec, self.weights.layers[layer]
        x = rms_norm(h, w.input_norm, s.rms_norm_eps)
        qkv = F.linear(x, w.qkv, w.qkv_bias)
        q, k, v = qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], dim=-1)
        q = apply_rope(q.view(-1, s.num_heads, s.head_dim), positions, s.rope, self.freq)
        k = apply_rope(k.view(-1, s.num_kv_heads, s.head_dim), positions, s.rope, self.freq)
        return q, k, v.view(-1, s.num_kv_heads, s.head_dim)

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, post-attention norm, SwiGLU MLP and residual."""
        s, w = self.spec, self.weights.layers[layer]
        h = h + F.linear(attn, w.o)
        x = rms_norm(h, w.post_norm, s.rms_norm_eps)
        gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w.down)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32."""
        x = rms_norm(h, self.weights.norm, self.spec.rms_norm_eps)
        return F.linear(x, self.weights.lm_head).float()

    @torch.inference_mode()
    def prefill(
        self, ids: torch.Tensor, positions: torch.Tensor | None = None, logits_at: torch.Tensor | None = None
    ) -> Prefill:
        """Full forward of a token sequence; logits at `logits_at` token indices (default: the last token)."""
        ids = ids.to(self.device)
        if positions is None:
            positions = torch.arange(ids.shape[0], device=self.device)
        positions = positions.to(self.device)
        if int(positions.max()) >= self.spec.max_position:
            raise ValueError(f"position {int(positions.max())} exceeds the model's max length {self.spec.max_position}")
        s = self.spec
        ks = torch.empty(s.num_layers, ids.shape[0], s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device)
        vs = torch.empty_like(ks)
        h = self.embed(ids)
        for layer in range(s.num_layers):
            q, k, v = self.qkv(layer, h, positions)
            ks[layer], vs[layer] = k, v
            h = self.finish_layer(layer, h, attention(q, positions, k, v, positions))
        at = torch.tensor([ids.shape[0] - 1], device=self.device) if logits_at is None else logits_at.to(self.device)
        return Prefill(k=ks, v=vs, logits=self.logits(h[at]))
