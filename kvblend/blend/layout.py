"""PromptLayout: a RAG prompt as token-id segments — prefix, retrieved chunks (each with its ChunkKey), suffix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvblend.store.key import ChunkKey, token_ids_hash


class LayoutError(ValueError):
    """The prompt layout cannot be blended; the message says which segment and why."""


@dataclass(frozen=True)
class ChunkRef:
    """A retrieved chunk: its token ids exactly as cached, and the key its KV is stored under."""

    token_ids: tuple[int, ...]
    key: ChunkKey

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise LayoutError("empty chunk: a chunk needs at least one token")
        if self.key.num_tokens != len(self.token_ids) or self.key.tokens_hash != token_ids_hash(self.token_ids):
            raise LayoutError(f"chunk key {self.key.digest[:12]} was made for other token ids")


@dataclass(frozen=True)
class PromptLayout:
    """[prefix][chunk 0]...[chunk n-1][suffix], all positions contiguous from 0."""

    prefix: tuple[int, ...]
    chunks: tuple[ChunkRef, ...]
    suffix: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.suffix:
            raise LayoutError("empty suffix: the question (and chat template tail) must have at least one token")

    @classmethod
    def build(cls, prefix: Sequence[int], chunks: Sequence[ChunkRef], suffix: Sequence[int]) -> "PromptLayout":
        return cls(tuple(int(t) for t in prefix), tuple(chunks), tuple(int(t) for t in suffix))

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + sum(len(c.token_ids) for c in self.chunks) + len(self.suffix)

    def chunk_starts(self) -> list[int]:
        """Prompt position of each chunk's first token."""
        starts, pos = [], len(self.prefix)
        for chunk in self.chunks:
            starts.append(pos)
            pos += len(chunk.token_ids)
        return starts

    @property
    def suffix_start(self) -> int:
        return self.num_tokens - len(self.suffix)

    def token_ids(self) -> torch.Tensor:
        ids = list(self.prefix)
        for chunk in self.chunks:
            ids.extend(chunk.token_ids)
        ids.extend(self.suffix)
        return torch.tensor(ids, dtype=torch.int64)
