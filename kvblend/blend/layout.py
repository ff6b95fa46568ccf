"""PromptLayout: a prompt as token-id segments — plain tokens (always computed) and cached chunks.

The usual RAG shape is [prefix][chunk 0]...[chunk n-1][suffix]; chunks discovered inside an arbitrary prompt
may also have plain tokens between them. Positions are contiguous from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

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


Segment = Union[tuple[int, ...], ChunkRef]


@dataclass(frozen=True)
class PromptLayout:
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not self.segments or self.num_tokens == 0:
            raise LayoutError("empty prompt")
        if any(not isinstance(s, ChunkRef) and len(s) == 0 for s in self.segments):
            raise LayoutError("empty plain segment")

    @classmethod
    def build(cls, prefix: Sequence[int], chunks: Sequence[ChunkRef], suffix: Sequence[int]) -> "PromptLayout":
        """[prefix][chunks...][suffix] for a RAG question; the suffix (question) must not be empty."""
        if not suffix:
            raise LayoutError("empty suffix: the question (and chat template tail) must have at least one token")
        head = (tuple(int(t) for t in prefix),) if prefix else ()
        return cls(head + tuple(chunks) + (tuple(int(t) for t in suffix),))

    @classmethod
    def from_segments(cls, segments: Sequence[Sequence[int] | ChunkRef]) -> "PromptLayout":
        """Any mix of plain token runs and chunks; empty plain runs are dropped."""
        kept = [s if isinstance(s, ChunkRef) else tuple(int(t) for t in s) for s in segments]
        return cls(tuple(s for s in kept if isinstance(s, ChunkRef) or s))

    @staticmethod
    def _len(segment: Segment) -> int:
        return len(segment.token_ids) if isinstance(segment, ChunkRef) else len(segment)

    @property
    def num_tokens(self) -> int:
        return sum(self._len(s) for s in self.segments)

    @property
    def chunks(self) -> tuple[ChunkRef, ...]:
        return tuple(s for s in self.segments if isinstance(s, ChunkRef))

    @property
    def prefix(self) -> tuple[int, ...]:
        """Plain tokens before the first chunk."""
        first = self.segments[0]
        return () if isinstance(first, ChunkRef) else first

    @property
    def suffix(self) -> tuple[int, ...]:
        """Plain tokens after the last chunk."""
        last = self.segments[-1]
        return () if isinstance(last, ChunkRef) or len(self.segments) == 1 else last

    def chunk_starts(self) -> list[int]:
        """Prompt position of each chunk's first token."""
        starts, pos = [], 0
        for segment in self.segments:
            if isinstance(segment, ChunkRef):
                starts.append(pos)
            pos += self._len(segment)
        return starts

    @property
    def suffix_start(self) -> int:
        return self.num_tokens - len(self.suffix)

    def token_ids(self) -> torch.Tensor:
        ids: list[int] = []
        for segment in self.segments:
            ids.extend(segment.token_ids if isinstance(segment, ChunkRef) else segment)
        return torch.tensor(ids, dtype=torch.int64)
