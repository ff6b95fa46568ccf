"""Llama-family weights loaded from safetensors into per-layer dataclasses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kvblend.model.spec import ModelSpec


@dataclass
class LayerWeights:
    """One decoder layer as in the checkpoint; `fuse_projections` adds concatenated QKV and gate/up weights
    (fewer, larger GEMMs for the GPU; on the CPU the unfused GEMMs round bf16 exactly as transformers does)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    qkv: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None


@dataclass
class LlamaWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return tensors


def load_weights(model_dir: str | os.PathLike, spec: ModelSpec, device: str | torch.device = "cpu") -> LlamaWeights:
    """Read an HF Llama/Mistral/Qwen2/Qwen3 checkpoint in the spec's dtype on `device`."""
    return weights_from_tensors(_read_tensors(Path(model_dir)), spec, device, str(model_dir))


def weights_from_tensors(tensors: dict[str, torch.Tensor], spec: ModelSpec, device: str | torch.device = "cpu",
                         origin: str = "state dict") -> LlamaWeights:
    """LlamaWeights from HF-named tensors (a checkpoint, or a live transformers model's parameters, which are
    shared, not copied, when dtype and device already match)."""
    raw = dict(tensors)
    dtype = spec.torch_dtype

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise KeyError(f"{origin} lacks tensor {name!r}")
        return raw.pop(name).detach().to(device=device, dtype=dtype)

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        biases = {f"{n}_bias": take(p + f"self_attn.{n}_proj.bias") for n in "qkv"} if spec.attention_bias else {}
        if spec.qk_norm:
            biases.update(q_norm=take(p + "self_attn.q_norm.weight"), k_norm=take(p + "self_attn.k_norm.weight"))
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                q=take(p + "self_attn.q_proj.weight"),
                k=take(p + "self_attn.k_proj.weight"),
                v=take(p + "self_attn.v_proj.weight"),
                o=take(p + "self_attn.o_proj.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate=take(p + "mlp.gate_proj.weight"),
                up=take(p + "mlp.up_proj.weight"),
                down=take(p + "mlp.down_proj.weight"),
                **biases,
            )
        )
    embed = take("model.embed_tokens.weight")
    lm_head = embed if spec.tie_word_embeddings or "lm_head.weight" not in raw else take("lm_head.weight")
    return LlamaWeights(embed=embed, layers=layers, norm=take("model.norm.weight"), lm_head=lm_head)


def fuse_projections(weights: LlamaWeights) -> None:
    """Concatenate each layer's Q/K/V and gate/up weights and make the separate ones views of them (so the
    fused copy replaces, not doubles, weights that nothing else holds)."""
    for w in weights.layers:
        w.qkv = torch.cat([w.q, w.k, w.v])
        w.q, w.k, w.v = w.qkv.split([w.q.shape[0], w.k.shape[0], w.v.shape[0]])
        if w.q_bias is not None:
            w.qkv_bias = torch.cat([w.q_bias, w.k_bias, w.v_bias])
        w.gate_up = torch.cat([w.gate, w.up])
        w.gate, w.up = w.gate_up.split([w.gate.shape[0], w.up.shape[0]])
