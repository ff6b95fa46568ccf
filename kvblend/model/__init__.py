"""Model side: ModelSpec and fingerprint, RoPE, safetensors weights, the torch Llama-family runner."""

from kvblend.model.rope import UnsupportedRope, apply_rope, inv_freq, rope_shift
from kvblend.model.runner import LlamaModel, Prefill, attention, rms_norm
from kvblend.model.spec import ModelSpec, RopeSpec, load_spec, spec_from_config

__all__ = [
    "LlamaModel",
    "ModelSpec",
    "Prefill",
    "RopeSpec",
    "UnsupportedRope",
    "apply_rope",
    "attention",
    "inv_freq",
    "load_spec",
    "rms_norm",
    "rope_shift",
    "spec_from_config",
]
