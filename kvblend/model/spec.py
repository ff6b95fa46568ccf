"""ModelSpec: the shape and RoPE of a Llama-family decoder, read from an HF config, plus its fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvblend.rope import RopeSpec

RUNNER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the runner, the store and the blend engine need to know about a model's shape."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    rms_norm_eps: float
    rope: RopeSpec
    dtype: str
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    weights_id: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim {self.rope.rotary_dim} exceeds head_dim {self.head_dim}")

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of Q and K before RoPE (Qwen3)."""
        return self.architecture == "Qwen3ForCausalLM"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def with_dtype(self, dtype: str | torch.dtype) -> "ModelSpec":
        """The same model run in another dtype (a different fingerprint: its KV differs)."""
        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        values = asdict(self)
        values["rope"] = self.rope
        values["dtype"] = name
        return ModelSpec(**values)

    @property
    def fingerprint(self) -> str:
        """Hash over architecture config, dtype and weights identity: KV of another model can never match."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def rope_from_config(cfg: dict, head_dim: int) -> RopeSpec:
    """Build a RopeSpec from an HF config (`rope_scaling` or the newer `rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    scaling_type = merged.pop("rope_type", merged.pop("type", "default")) or "default"
    partial = float(merged.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    style = "gptj" if cfg.get("rope_interleaved") or cfg.get("rope_is_neox_style") is False else "neox"
    return RopeSpec(
        theta=theta,
        rotary_dim=int(head_dim * partial),
        style=style,
        scaling_type=scaling_type,
        scaling=merged,
    )


def spec_from_config(cfg: dict, dtype: str | None = None, weights_id: str = "") -> ModelSpec:
    """Read a ModelSpec from a parsed HF config.json."""
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return ModelSpec(
        architecture=archs[0],
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=rope_from_config(cfg, head_dim),
        dtype=dtype,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", archs[0] == "Qwen2ForCausalLM")),
        weights_id=weights_id,
    )


def load_spec(model_dir: str | os.PathLike, dtype: str | None = None) -> ModelSpec:
    """ModelSpec of an HF model directory, with the weights identity filled in."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not an HF model directory: config.json is missing")
    cfg = json.loads(config_path.read_text())
    return spec_from_config(cfg, dtype=dtype, weights_id=weights_identity(model_dir))


def model_fingerprint(model_dir: str | os.PathLike, dtype: str | torch.dtype) -> str:
    """The fingerprint every ChunkKey of this model carries. RAGPipeline and the vLLM connector both call this with
    the directory vLLM serves and the dtype it runs in, so their keys agree."""
    return load_spec(model_dir, dtype=dtype if isinstance(dtype, str) else dtype_name(dtype)).fingerprint


def weights_identity(model_dir: str | os.PathLike) -> str:
    """sha256 over the safetensors files' bytes, cached beside them by (name, size, mtime)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    cache = model_dir / ".kvblend_weights_id.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["stamp"] == [list(s) for s in stamp]:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    value = digest.hexdigest()
    try:
        cache.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    except OSError:
        pass
    return value

