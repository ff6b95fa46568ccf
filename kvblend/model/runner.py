"""A small torch runner for Llama-family decoders, exposed as the per-layer steps the blend engine composes.

It is the numerical reference for the blend engine and the Triton kernels, and the precompute path.
Shapes: hidden [tokens, hidden]; q [tokens, heads, head_dim]; k, v [tokens, kv_heads, head_dim].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvblend.model.ops import DEFAULT_OPS, ModelOps
from kvblend.model.spec import RUNNER_ARCHITECTURES, ModelSpec, load_spec
from kvblend.model.weights import LlamaWeights, load_weights
from kvblend.rope import cos_sin, inv_freq
from kvblend.triton_kernels import silu_mul, silu_mul_fused


@dataclass
class Prefill:
    """Per-layer K (after RoPE) and V, stacked [layers, tokens, kv_heads, head_dim], and the requested logits."""

    k: torch.Tensor
    v: torch.Tensor
    logits: torch.Tensor


def attention(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Attention of queries over keys, causal by absolute position (key pos <= query pos), GQA; [tq, heads*dim]."""
    mask = k_pos[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask[None, None], enable_gqa=True
    )
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


class LlamaModel:
    """Weights plus the per-layer steps: embed, qkv (norm + projection + RoPE), attend, finish_layer, logits."""

    def __init__(self, spec: ModelSpec, weights: LlamaWeights, ops: ModelOps = DEFAULT_OPS) -> None:
        if spec.architecture not in RUNNER_ARCHITECTURES:
            raise ValueError(f"the torch runner does not run {spec.architecture}; it runs {RUNNER_ARCHITECTURES}")
        self.spec = spec
        self.weights = weights
        self.ops = ops
        self.device = weights.embed.device
        self.freq = inv_freq(spec.rope).to(self.device)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, dtype: str | None = None, device: str = "cpu",
                 ops: ModelOps = DEFAULT_OPS) -> "LlamaModel":
        spec = load_spec(model_dir, dtype=dtype)
        return cls(spec, load_weights(model_dir, spec, device), ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.device), self.weights.embed)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions`, computed once and shared by every layer."""
        return cos_sin(self.freq, positions.to(self.device))

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
            rot: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, Q/K/V projections and RoPE at `positions` (`rot`: their precomputed cos/sin)."""
        s, w = self.spec, self.weights.layers[layer]
        cos, sin = self.rotary(positions) if rot is None else rot
        x = self.ops.rms_norm(h, w.input_norm, s.rms_norm_eps)
        if w.qkv is not None:
            q, k, v = F.linear(x, w.qkv, w.qkv_bias).split(
                [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], dim=-1)
        else:
            q, k, v = F.linear(x, w.q, w.q_bias), F.linear(x, w.k, w.k_bias), F.linear(x, w.v, w.v_bias)
        q, k = q.reshape(-1, s.num_heads, s.head_dim), k.reshape(-1, s.num_kv_heads, s.head_dim)
        if w.q_norm is not None:
            q = self.ops.rms_norm(q.reshape(-1, s.head_dim), w.q_norm, s.rms_norm_eps).view(q.shape)
            k = self.ops.rms_norm(k.reshape(-1, s.head_dim), w.k_norm, s.rms_norm_eps).view(k.shape)
        q, k = self.ops.rope_qk(q, k, cos, sin, s.rope.style)
        return q, k, v.reshape(-1, s.num_kv_heads, s.head_dim)

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, post-attention norm, SwiGLU MLP and residual."""
        s, w = self.spec, self.weights.layers[layer]
        h = h + F.linear(attn, w.o)
        x = self.ops.rms_norm(h, w.post_norm, s.rms_norm_eps)
        if w.gate_up is not None:
            act = silu_mul_fused(F.linear(x, w.gate_up))
        else:
            act = silu_mul(F.linear(x, w.gate), F.linear(x, w.up))
        return h + F.linear(act, w.down)

    def heads_sum(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over attention heads as taken here: complete already (this runner holds every head)."""
        return t

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32."""
        x = self.ops.rms_norm(h, self.weights.norm, self.spec.rms_norm_eps)
        return F.linear(x, self.weights.lm_head).float()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                logits_at: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run n tokens after the KV already in cache rows [0, start) (at positions [0, start)); write their K/V
        into cache rows [start, start + n) of the buffers [layers, capacity, kv_heads, head_dim] in place; return
        logits at `logits_at` (indices into the new tokens; default the last). Positions default to
        [start, start + n); attention is causal by position."""
        n = ids.shape[0]
        end = start + n
        if end > cache_k.shape[1]:
            raise ValueError(f"cache holds {cache_k.shape[1]} rows, {end} needed")
        positions = torch.arange(start, end, device=self.device) if positions is None else positions.to(self.device)
        if int(positions.max()) >= self.spec.max_position:
            raise ValueError(f"position {int(positions.max())} exceeds the model's max length {self.spec.max_position}")
        key_pos = torch.cat([torch.arange(start, device=self.device), positions])
        h = self.embed(ids)
        rot = self.rotary(positions)
        for layer in range(self.spec.num_layers):
            q, k, v = self.qkv(layer, h, positions, rot)
            cache_k[layer, start:end], cache_v[layer, start:end] = k, v
            attn = attention(q, positions, cache_k[layer, :end], cache_v[layer, :end], key_pos)
            h = self.finish_layer(layer, h, attn)
        at = torch.tensor([n - 1], device=self.device) if logits_at is None else logits_at.to(self.device)
        return self.logits(h[at])

    def empty_cache(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        k = torch.empty(s.num_layers, capacity, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device)
        return k, torch.empty_like(k)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> Prefill:
        """Full forward of a token sequence (at `positions`, default 0..n-1): K/V per layer, logits at `logits_at`."""
        k, v = self.empty_cache(ids.shape[0])
        logits = self.forward(ids.to(self.device), k, v, 0, logits_at, positions)
        return Prefill(k=k, v=v, logits=logits)

    @torch.inference_mode()
    def greedy(self, k: torch.Tensor, v: torch.Tensor, next_logits: torch.Tensor, steps: int) -> list[int]:
        """Greedy continuation of `steps` tokens from a prompt's KV [layers, P, ...] and its last-token logits."""
        prompt_len = k.shape[1]
        cache_k, cache_v = self.empty_cache(prompt_len + steps)
        cache_k[:, :prompt_len], cache_v[:, :prompt_len] = k, v
        tokens, logits = [], next_logits.reshape(-1)
        for i in range(steps):
            tokens.append(int(logits.argmax()))
            if i + 1 < steps:
                ids = torch.tensor([tokens[-1]], device=self.device)
                logits = self.forward(ids, cache_k, cache_v, prompt_len + i).reshape(-1)
        return tokens
