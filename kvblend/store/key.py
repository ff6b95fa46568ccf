"""ChunkKey: the content address of a chunk's KV, stable across processes and machines."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONTEXTS = ("alone", "behind_prefix")
_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def token_ids_hash(token_ids: Sequence[int]) -> str:
    """sha256 over the token ids as little-endian int64 (platform independent)."""
    if len(token_ids) == 0:
        raise ValueError("a chunk needs at least one token")
    return hashlib.sha256(np.asarray(token_ids, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class ChunkKey:
    """Hash over (model fingerprint, namespace, chunk context, token ids).

    `context` says how the KV was computed: "alone" (from position 0) or "behind_prefix:<prefix hash>"
    (behind a shared prompt prefix); any difference in any field gives a different key.
    """

    fingerprint: str
    namespace: str
    context: str
    tokens_hash: str
    num_tokens: int

    def __post_init__(self) -> None:
        if not self.fingerprint:
            raise ValueError("ChunkKey needs a model fingerprint")
        if not _NAME.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} must be 1-128 chars of [A-Za-z0-9._:-]")
        if self.context.split(":", 1)[0] not in CONTEXTS:
            raise ValueError(f"chunk context {self.context!r} must start with one of {CONTEXTS}")
        if self.num_tokens <= 0:
            raise ValueError("a chunk needs at least one token")

    @classmethod
    def for_tokens(
        cls, fingerprint: str, token_ids: Sequence[int], namespace: str = "default", context: str = "alone"
    ) -> "ChunkKey":
        return cls(fingerprint, namespace, context, token_ids_hash(token_ids), len(token_ids))

    @classmethod
    def alone(cls, fingerprint, token_ids, namespace="default"):  # TEMP until the restructuring lands
        return cls.for_tokens(fingerprint, token_ids, namespace, "alone")

    @property
    def digest(self) -> str:
        """64 hex chars naming the entry in every tier."""
        blob = "\0".join(
            ("kvblend-chunk-v1", self.fingerprint, self.namespace, self.context, self.tokens_hash, str(self.num_tokens))
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def __str__(self) -> str:
        return self.digest
