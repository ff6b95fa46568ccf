"""The model's tokenizer and chat template (transformers, imported only here)."""

from __future__ import annotations

import os


def load_tokenizer(model_dir: str | os.PathLike):
    """HF tokenizer of a model directory; raises a clear error when the directory has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no usable tokenizer in {model_dir}: {exc}") from exc


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of plain text, without BOS or other special tokens (chunks are embedded mid-prompt)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
