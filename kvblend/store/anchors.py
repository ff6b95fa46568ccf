"""ChunkAnchorIndex: find cached chunks anywhere in a prompt by content hash, with no separator strings.

Every chunk stored "alone" is registered under the hash of its first ANCHOR_TOKENS tokens and its namespace (its
anchor), with its length and token-ids hash. To find chunks of a namespace in a prompt, hash every window of
ANCHOR_TOKENS tokens in that namespace, look the anchors up, and confirm a candidate by hashing the prompt span
it would cover. Anchors of different namespaces never meet, so a lookup never sees another tenant's chunks.
The index lives beside the entries (in memory, a directory of anchor files, Redis sets) so any process or host
that sees the store sees the index.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kvblend.store.key import DEFAULT_NAMESPACE, token_ids_hash
from kvblend.store.redis_tier import RedisTier

log = logging.getLogger(__name__)
ANCHOR_TOKENS = 16

Candidate = tuple[int, str]  # (num_tokens, token-ids hash)


def anchors(token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """Anchor of every window of ANCHOR_TOKENS tokens in `namespace`: blake2b-64 of the window's little-endian
    int64 bytes, keyed with a hash of the namespace."""
    arr = np.asarray(token_ids, dtype="<i8")
    if arr.size < ANCHOR_TOKENS:
        return []
    raw = arr.tobytes()
    width = 8 * ANCHOR_TOKENS
    keyed = hashlib.blake2b(digest_size=8, key=hashlib.blake2b(namespace.encode(), digest_size=32).digest())
    hashes = []
    for i in range(arr.size - ANCHOR_TOKENS + 1):
        h = keyed.copy()
        h.update(raw[8 * i : 8 * i + width])
        hashes.append(h.hexdigest())
    return hashes


class ChunkAnchorIndex:
    """Anchor -> {(num_tokens, tokens_hash)}, in process memory and optionally a directory and Redis."""

    def __init__(self, disk_dir: str | os.PathLike | None = None, redis: "RedisTier | None" = None) -> None:
        self._memory: dict[str, set[Candidate]] = {}
        self.dir = Path(disk_dir) if disk_dir else None
        self.redis = redis
        self.prefix = redis.config.prefix + "index:" if redis is not None else ""

    def remember(self, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> tuple[str, Candidate] | None:
        """Register a chunk of `namespace` in this process only (another process already wrote it to the shared
        index)."""
        found = anchors(token_ids[:ANCHOR_TOKENS], namespace)
        if not found:
            return None
        anchor, entry = found[0], (len(token_ids), token_ids_hash(token_ids))
        self._memory.setdefault(anchor, set()).add(entry)
        return anchor, entry

    def add(self, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Register a chunk of `namespace` everywhere; False if it is shorter than an anchor (such chunks cannot
        be found)."""
        registered = self.remember(token_ids, namespace)
        if registered is None:
            return False
        anchor, entry = registered
        line = f"{entry[0]} {entry[1]}\n"
        if self.dir is not None:
            try:
                path = self.dir / anchor[:2] / anchor
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as fh:
                    fh.write(line)
            except OSError as exc:
                log.warning("chunk index: cannot write anchor file for %s: %s", anchor, exc)
        if self.redis is not None:
            self.redis.call("sadd", lambda: self.redis.client.sadd(self.prefix + anchor, line.strip()), 0)
        return True

    def _lookup(self, wanted: list[str]) -> dict[str, set[Candidate]]:
        found: dict[str, set[Candidate]] = {a: set(self._memory[a]) for a in wanted if a in self._memory}
        if self.dir is not None:
            for a in wanted:
                try:
                    text = (self.dir / a[:2] / a).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    n, _, h = line.partition(" ")
                    if n.isdigit() and len(h) == 64:
                        found.setdefault(a, set()).add((int(n), h))
        if self.redis is not None:
            def run():
                pipe = self.redis.client.pipeline(transaction=False)
                for a in wanted:
                    pipe.smembers(self.prefix + a)
                return pipe.execute()

            for a, members in zip(wanted, self.redis.call("smembers", run, [])):
                for m in members:
                    n, _, h = m.decode().partition(" ")
                    if n.isdigit():
                        found.setdefault(a, set()).add((int(n), h))
        return found

    def find(self, prompt: Sequence[int], namespace: str = DEFAULT_NAMESPACE,
             min_tokens: int = ANCHOR_TOKENS) -> list[tuple[int, int]]:
        """Non-overlapping (start, length) spans of the prompt that are chunks registered in `namespace`, left
        to right, longest first where several start at the same token."""
        windows = anchors(prompt, namespace)
        if not windows:
            return []
        table = self._lookup(sorted(set(windows)))
        spans, i = [], 0
        while i < len(windows):
            hit = None
            for n, h in sorted(table.get(windows[i], ()), reverse=True):
                if n >= min_tokens and i + n <= len(prompt) and token_ids_hash(prompt[i : i + n]) == h:
                    hit = n
                    break
            if hit:
                spans.append((i, hit))
                i += hit
            else:
                i += 1
        return spans
