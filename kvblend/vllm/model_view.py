"""The blend engine's per-layer model steps on the modules vLLM loaded: one copy of the weights, vLLM's kernels.

Llama, Mistral, Qwen2 and Qwen3 decoder layers in vLLM share one shape: input_layernorm, self_attn (qkv_proj,
optional q_norm/k_norm per head, rotary_emb, attn, o_proj), post_attention_layernorm, mlp. The view calls those
modules in the order their own forward does, splitting it where the blend needs Q/K/V (deviation, selection)
and attention over a sparse set of rows (the KV target). Rope scaling, partial rotary, QKV bias and q/k norm
are whatever vLLM's modules do. Anything else is refused by name, with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from collections.abc import Callable

from kvblend.model.ops import ModelOps
from kvblend.model.spec import ModelSpec
from kvblend.rope import inv_freq

BLENDABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("qkv_proj", "rotary_emb", "attn", "o_proj", "q_size", "kv_size", "num_heads", "num_kv_heads",
                    "head_dim")


def unsupported_reason(model: nn.Module, spec: ModelSpec) -> str | None:
    """Why the blend cannot run on this vLLM model (None: it can)."""
    if spec.architecture not in BLENDABLE_ARCHITECTURES:
        return f"architecture {spec.architecture} is not blendable (supported: {', '.join(BLENDABLE_ARCHITECTURES)})"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "embed_input_ids") or not hasattr(inner, "norm"):
        return f"{type(model).__name__} does not have the decoder shape kvblend blends on"
    if len(layers) != spec.num_layers:
        return f"vLLM's model holds {len(layers)} of {spec.num_layers} layers (pipeline parallelism is not supported)"
    for i, layer in enumerate(layers):
        missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
        missing += [f"self_attn.{p}" for p in _ATTENTION_PARTS if not hasattr(getattr(layer, "self_attn", None), p)]
        if missing:
            return f"layer {i} ({type(layer).__name__}) lacks {', '.join(missing)}"
        if getattr(layer.self_attn, "do_llama_4_scaling", False) or getattr(layer, "ada_rms_norm_t_cond", None):
            return f"layer {i} uses position-dependent attention scaling or conditioned norms, which the blend omits"
        if layer.self_attn.num_heads != spec.num_heads or layer.self_attn.num_kv_heads != spec.num_kv_heads:
            return (f"vLLM's attention heads ({layer.self_attn.num_heads} query, {layer.self_attn.num_kv_heads} KV) "
                    f"differ from this rank's share of the checkpoint's ({spec.num_heads}, {spec.num_kv_heads})")
    return None


class VllmModelView:
    """embed / qkv / finish_layer / logits on vLLM's modules, with the attributes BlendEngine reads. Under tensor
    parallelism the modules hold one rank's heads (`spec` says how many) and `tp_sum` sums over the ranks."""

    def __init__(self, model: nn.Module, spec: ModelSpec, ops: ModelOps,
                 tp_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        reason = unsupported_reason(model, spec)
        if reason:
            raise ValueError(reason)
        self.model, self.inner, self.layers = model, model.model, model.model.layers
        self.spec, self.ops = spec, ops
        self.tp_sum = tp_sum
        param = next(model.parameters())
        self.device = param.device
        self.freq = inv_freq(spec.rope).to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype

    def heads_sum(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over attention heads taken over this rank's heads, completed over the tensor-parallel ranks."""
        return t if self.tp_sum is None else self.tp_sum(t)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(ids.to(self.device))

    def rotary(self, positions: torch.Tensor) -> None:
        """vLLM's rotary embedding keeps its own cos/sin cache: nothing to precompute."""
        return None

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
            rot: None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, QKV projection (with bias where the model has one), per-head q/k norm, vLLM's RoPE."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(h)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        if getattr(attn, "q_norm", None) is not None and getattr(attn, "qk_norm", True):
            q = attn.q_norm(q.reshape(-1, attn.num_heads, attn.head_dim)).reshape(-1, attn.q_size)
            k = attn.k_norm(k.reshape(-1, attn.num_kv_heads, attn.head_dim)).reshape(-1, attn.kv_size)
        q, k = attn.rotary_emb(positions.to(self.device), q, k)
        return (q.reshape(-1, attn.num_heads, attn.head_dim), k.reshape(-1, attn.num_kv_heads, attn.head_dim),
                v.reshape(-1, attn.num_kv_heads, attn.head_dim))

    def finish_layer(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, fused residual add + post-attention norm, MLP and residual (may reuse h's storage)."""
        block = self.layers[layer]
        out, _ = block.self_attn.o_proj(attn_out)
        x, h = block.post_attention_layernorm(out, h)
        return h + block.mlp(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and vLLM's logits processor, in fp32."""
        if h.shape[0] == 0:
            return torch.empty(0, self.spec.vocab_size, device=self.device)
        return self.model.compute_logits(self.inner.norm(h)).float()
