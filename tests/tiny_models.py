"""Tiny random-weight checkpoints of the architectures the blend supports (and one it does not), for the vLLM
tests: a transformers config + save_pretrained, a few MB, with the embedded SmolLM2's tokenizer so prompts are
real text. Nothing is downloaded."""

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
