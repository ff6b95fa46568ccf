"""The torch runner against transformers' LlamaForCausalLM on the same weights; ModelSpec and RoPE."""

import json

import pytest
import torch

from kvblend.model.runner import LlamaModel
from kvblend.model.spec import load_spec, spec_from_config
from kvblend.rope import RopeSpec, UnsupportedRope, apply_rope, inv_freq, rope_shift


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def hf_models(model_dir):
    from transformers import LlamaForCausalLM

    return {
        "float32": LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
        "bfloat16": LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval(),
    }


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("seed,length,offset", [(0, 61, 0), (1, 200, 37)])
@pytest.mark.slow
def test_runner_matches_transformers(model_dir, hf_models, dtype, tol, seed, length, offset):
    model = LlamaModel.from_dir(model_dir, dtype=dtype)
    hf = hf_models[dtype]
    ids = torch.randint(0, model.spec.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(offset, offset + length)
    ours = model.prefill(ids, positions, logits_at=torch.arange(length))
    with torch.no_grad():
        ref = hf(ids[None], position_ids=positions[None], use_cache=True)
    for layer in range(model.spec.num_layers):
        cache = ref.past_key_values.layers[layer]
        assert rel(ours.k[layer], cache.keys[0].transpose(0, 1)) < tol, f"K of layer {layer}"
        assert rel(ours.v[layer], cache.values[0].transpose(0, 1)) < tol, f"V of layer {layer}"
    assert rel(ours.logits, ref.logits[0]) < tol
    assert torch.equal(ours.logits.argmax(-1), ref.logits[0].float().argmax(-1)) or dtype == "bfloat16"


def test_spec_reads_smollm2(model_dir):
    spec = load_spec(model_dir)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    assert spec.rope.theta == 100000.0 and spec.rope.scaling_type == "default" and spec.rope.style == "neox"
    assert spec.dtype == "bfloat16" and spec.vocab_size == 49152 and spec.tie_word_embeddings


def test_fingerprint_covers_dtype_config_and_weights(model_dir):
    spec = load_spec(model_dir)
    assert spec.fingerprint == load_spec(model_dir).fingerprint
    assert spec.with_dtype("float32").fingerprint != spec.fingerprint
    cfg = json.loads((model_dir / "config.json").read_text())
    assert spec_from_config(cfg, weights_id=spec.weights_id).fingerprint == spec.fingerprint
    assert spec_from_config(cfg, weights_id="other weights").fingerprint != spec.fingerprint
    assert spec_from_config({**cfg, "rms_norm_eps": 1e-6}, weights_id=spec.weights_id).fingerprint != spec.fingerprint


def test_rope_config_variants():
    base = {"hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 10}
    llama31 = spec_from_config({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert llama31.rope.scaling_type == "llama3" and llama31.rope.scaling["factor"] == 8.0
    partial = spec_from_config({**base, "partial_rotary_factor": 0.5})
    assert partial.rope.rotary_dim == 32
    other = spec_from_config({**base, "architectures": ["GPT2LMHeadModel"]})  # a spec describes any decoder
    with pytest.raises(ValueError, match="does not run GPT2LMHeadModel"):
        LlamaModel(other, weights=None)  # the torch runner only runs the Llama family
    with pytest.raises(UnsupportedRope, match="dynamic"):
        inv_freq(spec_from_config({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}).rope)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_theta=500000.0,
                      rope_scaling=scaling if scaling["rope_type"] != "default" else None)
    spec = spec_from_config(cfg.to_dict())
    if scaling["rope_type"] == "default":
        head_dim = 128
        expected = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    torch.testing.assert_close(inv_freq(spec.rope), expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rope_shift_equals_direct_rotation(style, rotary_dim):
    rope = RopeSpec(theta=10000.0, rotary_dim=rotary_dim, style=style)
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(50, 3, 64, generator=g)
    old = torch.randint(0, 500, (50,), generator=g)
    new = torch.randint(0, 2000, (50,), generator=g)
    shifted = rope_shift(apply_rope(raw, old, rope), new - old, rope)
    direct = apply_rope(raw, new, rope)
    assert rel(shifted, direct) < 1e-5
    assert torch.equal(shifted[..., rotary_dim:], raw[..., rotary_dim:])


@pytest.mark.slow
def test_fused_projections_compute_the_same_model(model_dir):
    from kvblend.model.weights import fuse_projections

    plain = LlamaModel.from_dir(model_dir, dtype="float32")
    fused = LlamaModel.from_dir(model_dir, dtype="float32")
    fuse_projections(fused.weights)
    assert fused.weights.layers[0].qkv is not None and fused.weights.layers[0].q.data_ptr() == fused.weights.layers[0].qkv.data_ptr()
    ids = torch.randint(0, plain.spec.vocab_size, (45,), generator=torch.Generator().manual_seed(4))
    a, b = plain.prefill(ids), fused.prefill(ids)
    assert rel(b.k, a.k) < 1e-5 and rel(b.v, a.v) < 1e-5 and rel(b.logits, a.logits) < 1e-5
