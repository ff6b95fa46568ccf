"""Tiny random-weight checkpoints of the architectures the blend supports (and one it does not), for the vLLM
tests: a transformers config + save_pretrained, a few MB, with the embedded SmolLM2's tokenizer so prompts are
real text; and a small random Llama on kvblend's own runner (`random_llama`). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 49152  # SmolLM2's tokenizer
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.08, tie_word_embeddings=True)


def tiny_config(architecture: str):
    """A small config of `architecture` exercising what sets it apart (rope scaling, QKV bias, q/k norm)."""
    import transformers as tf

    if architecture == "LlamaForCausalLM":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 256, "rope_theta": 500000.0}
        return tf.LlamaConfig(**COMMON, rope_parameters=scaling)
    if architecture == "Qwen2ForCausalLM":
        return tf.Qwen2Config(**COMMON)
    if architecture == "Qwen3ForCausalLM":
        return tf.Qwen3Config(**COMMON, head_dim=32)
    if architecture == "MistralForCausalLM":
        return tf.MistralConfig(**COMMON, sliding_window=None)
    if architecture == "GemmaForCausalLM":
        return tf.GemmaConfig(**{**COMMON, "head_dim": 32})
    raise ValueError(f"no tiny config for {architecture}")


def save_tiny_model(architecture: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Random bf16 weights of a tiny `architecture` model plus the tokenizer of `tokenizer_dir`, in out_dir."""
    import transformers as tf

    config = tiny_config(architecture)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(tf, architecture)(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tf.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


RANDOM_LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"])


def random_llama(device: str = "cpu", dtype: str = "float32"):
    """A 6-layer random-weight Llama (vocabulary 512) on kvblend's torch runner, from seed 0."""
    from kvblend.model.runner import LlamaModel
    from kvblend.model.spec import spec_from_config
    from kvblend.model.weights import weights_from_tensors

    spec = spec_from_config(RANDOM_LLAMA, dtype=dtype, weights_id="random-test")
    gen = torch.Generator().manual_seed(0)
    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    shapes = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
              "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
              "mlp.down_proj.weight": (h, i)}
    tensors = {f"model.layers.{n}.{name}": torch.randn(shape, generator=gen) * (1.0 if len(shape) == 1 else 0.05)
               for n in range(spec.num_layers) for name, shape in shapes.items()}
    tensors["model.embed_tokens.weight"] = torch.randn(spec.vocab_size, h, generator=gen)
    tensors["model.norm.weight"] = torch.ones(h)
    tensors["lm_head.weight"] = torch.randn(spec.vocab_size, h, generator=gen) * 0.05
    return LlamaModel(spec, weights_from_tensors(tensors, spec, device))


def stored_blend_case(seed: int):
    """`random_llama`, a BlendEngine over a memory store holding three 48-token chunks, and a prompt layout of a
    5-token prefix, those chunks and an 11-token question, all drawn from `seed`."""
    from kvblend.blend.engine import BlendEngine
    from kvblend.blend.layout import ChunkRef, PromptLayout
    from kvblend.rag.precompute import chunk_key, compute_chunk_kv
    from kvblend.store import MemoryTier, TieredStore

    model = random_llama()
    gen = torch.Generator().manual_seed(seed)
    store = TieredStore([MemoryTier(1 << 28)])
    refs = []
    for _ in range(3):
        ids = torch.randint(0, 512, (48,), generator=gen).tolist()
        key = chunk_key(model, ids)
        store.put(key, compute_chunk_kv(model, key, ids))
        refs.append(ChunkRef(tuple(ids), key))
    prefix, question = torch.randint(0, 512, (5,), generator=gen).tolist(), torch.randint(0, 512, (11,), generator=gen).tolist()
    return model, BlendEngine(model, store), PromptLayout.build(prefix, refs, question)
