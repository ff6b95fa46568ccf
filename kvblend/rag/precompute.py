"""The precompute job: cut texts into chunks, compute each chunk's KV once, store it by ChunkKey.

Resumable: chunks whose key is already stored are skipped, so an interrupted run simply starts again.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from kvblend.blend.source import kv_layout
from kvblend.model.runner import LlamaModel
from kvblend.store.entry import ChunkKV
from kvblend.store.key import DEFAULT_NAMESPACE, ChunkKey
from kvblend.store.tiered import TieredStore


def chunk_key(model: LlamaModel, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE,
              prefix_ids: Sequence[int] | None = None) -> ChunkKey:
    """The key of the chunk's KV as this model computes it, alone or behind `prefix_ids`."""
    return ChunkKey.behind(model.spec.fingerprint, token_ids, prefix_ids, namespace)


def compute_chunk_kv(model: LlamaModel, key: ChunkKey, token_ids: Sequence[int],
                     prefix_ids: Sequence[int] | None = None) -> ChunkKV:
    """Prefill the chunk alone from position 0, or behind `prefix_ids`, and keep the chunk's own KV."""
    prefix = list(prefix_ids or [])
    ids = torch.tensor(prefix + list(token_ids), dtype=torch.int64)
    out = model.prefill(ids)
    n = len(prefix)
    return ChunkKV(
        key=key,
        k=out.k[:, n:].cpu().contiguous(),
        v=out.v[:, n:].cpu().contiguous(),
        token_ids=ids[n:].clone(),
        base_position=n,
    )


def token_windows(token_ids: Sequence[int], size: int) -> list[list[int]]:
    """Fixed windows of `size` tokens (the last may be shorter)."""
    if size <= 0:
        raise ValueError(f"chunk size must be positive, got {size}")
    return [list(token_ids[i : i + size]) for i in range(0, len(token_ids), size)]


@dataclass(frozen=True)
class PrecomputeConfig:
    chunk_tokens: int = 256
    namespace: str = DEFAULT_NAMESPACE
    max_chunks: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.max_chunks is not None and self.max_chunks <= 0:
            raise ValueError(f"max_chunks must be positive, got {self.max_chunks}")


@dataclass
class ChunkRecord:
    source: str
    index: int
    key: ChunkKey
    num_tokens: int
    computed: bool  # False: it was already in the store
    seconds: float
    stored: bool = False  # computed and, checked after the store's writes were flushed, held by the store


@dataclass
class PrecomputeReport:
    """Counts made from the store after the run, not from what was sent to it."""

    records: list[ChunkRecord] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return sum(r.computed and r.stored for r in self.records)

    @property
    def cached(self) -> int:
        return sum(not r.computed for r in self.records)

    @property
    def lost(self) -> int:
        """Computed but not held by the store afterwards (a tier refused or failed the write)."""
        return sum(r.computed and not r.stored for r in self.records)


def precompute_chunks(
    model: LlamaModel,
    store: TieredStore,
    chunks: Iterable[tuple[str, int, Sequence[int]]],
    namespace: str = DEFAULT_NAMESPACE,
    on_chunk: Callable[[ChunkRecord], None] | None = None,
) -> PrecomputeReport:
    """Compute and store the KV of (source, index, token_ids) chunks whose key the store lacks."""
    report = PrecomputeReport()
    for source, index, ids in chunks:
        key = chunk_key(model, ids, namespace)
        start = time.perf_counter()
        computed = store.get(key, layers=(0,), expect=kv_layout(model.spec)) is None  # a verified header + one-layer read, not a bare exists
        if computed:
            store.put(key, compute_chunk_kv(model, key, ids))
        record = ChunkRecord(source, index, key, len(ids), computed, time.perf_counter() - start)
        report.records.append(record)
        if on_chunk:
            on_chunk(record)
    store.flush()
    for record in report.records:
        record.stored = record.computed and store.holds(record.key)
    return report


def text_chunks(tokenizer, docs: Iterable, config: PrecomputeConfig) -> Iterator[tuple[str, int, tuple[int, ...]]]:
    """(source, index, token_ids) of the documents' chunks as the chunker cuts them (the keys a client sending
    their texts hits), at most `config.max_chunks` of them, cut lazily (a large file is never tokenized whole)."""
    from kvblend.retrieval.chunker import ChunkerConfig, iter_chunks

    chunker = ChunkerConfig(chunk_tokens=config.chunk_tokens)
    chunks = ((c.source, c.index, c.token_ids) for doc in docs for c in iter_chunks(tokenizer, doc, chunker))
    return itertools.islice(chunks, config.max_chunks)
