"""ChunkKey: the content address of a chunk's KV, stable across processes and machines, and the namespaces keys
are made in (a plain name, or a tenant's namespace derived from its secret)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

ALONE = "alone"  # KV computed from position 0, with nothing before the chunk
BEHIND_PREFIX = "behind_prefix"  # KV computed behind a shared prompt prefix: "behind_prefix:<prefix hash>"
CONTEXTS = (ALONE, BEHIND_PREFIX)
DEFAULT_NAMESPACE = "default"
TENANT_SECRET_ENV = "KVBLEND_TENANT_SECRET"
MIN_TENANT_SECRET = 16
_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a namespace as configured or requested
_KEY_NAMESPACE = re.compile(r"^[A-Za-z0-9._:-]{1,128}(~[0-9a-f]{32})?$")  # a name, or a name~tenant tag
_TENANT_PERSON = b"kvblend-tenant"
# v2: chunks are keyed by the ids of their own stripped text (kvblend.blend.prompt.chunk_token_ids), no longer
# by windows of a document's ids; v1 entries are misses (never read, evicted by their tier's LRU)
KEY_VERSION = "kvblend-chunk-v2"
WHOLE = ""  # the shard of KV holding every KV head (an engine without tensor parallelism)
_SHARD = re.compile(r"^tp([1-9][0-9]*)\.r([0-9]+)\.h([0-9]+)-([0-9]+)$")  # tp<world>.r<rank>.h<first>-<end>


def token_ids_hash(token_ids: Sequence[int]) -> str:
    """sha256 over the token ids' bytes (`token_bytes`)."""
    if len(token_ids) == 0:
        raise ValueError("a chunk needs at least one token")
    return hashlib.sha256(token_bytes(token_ids)).hexdigest()


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """The token ids as little-endian int64 (platform independent): what every key hash reads."""
    return np.asarray(token_ids, dtype="<i8").tobytes()


def chunk_context(prefix_ids: Sequence[int] | None) -> str:
    """The context of KV computed alone (no prefix) or behind the given shared prefix."""
    return ALONE if not prefix_ids else _behind(token_ids_hash(prefix_ids))


def _behind(prefix_hash: str) -> str:
    """The context named by the token ids hash of the prefix the KV was computed behind."""
    return f"{BEHIND_PREFIX}:{prefix_hash[:16]}"


def tp_shard(world: int, rank: int, first_head: int, end_head: int) -> str:
    """The shard of a tensor-parallel rank: its world size, rank and the KV heads [first_head, end_head) it holds
    (a TP=1 engine's KV is the whole, WHOLE)."""
    if world == 1:
        return WHOLE
    if not 0 <= rank < world or not 0 <= first_head < end_head:
        raise ValueError(f"rank {rank} of {world} holding KV heads [{first_head}, {end_head}) is not a shard")
    return f"tp{world}.r{rank}.h{first_head}-{end_head}"


def check_namespace_name(name: str) -> str:
    """`name` if it is a namespace a config or a request may name: 1-128 chars of [A-Za-z0-9._:-]."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"namespace {name!r} must be 1-128 chars of [A-Za-z0-9._:-]")
    return name


def check_tenant_secret(secret: str) -> str:
    """`secret` if it can be a tenant secret (a string of at least MIN_TENANT_SECRET chars); the error never
    shows it."""
    if not isinstance(secret, str) or len(secret) < MIN_TENANT_SECRET:
        raise ValueError(f"a tenant secret must be a string of at least {MIN_TENANT_SECRET} characters")
    return secret


def key_namespace(name: str, tenant_secret: str | None = None, server_key: str | bytes | None = None) -> str:
    """The namespace keys are made in: `name` itself without a tenant secret, else the tenant's own
    `name~<tag>`, the tag a BLAKE2b of (name, secret) keyed with the deployment secret `server_key`.

    '~' is not allowed in a name, so no request or config can name a tenant's namespace: its keys are reachable
    only with the tenant's secret (and, with a server key, only through a server holding that key)."""
    check_namespace_name(name)
    if tenant_secret is None:
        return name
    check_tenant_secret(tenant_secret)
    raw = server_key.encode() if isinstance(server_key, str) else (server_key or b"")
    key = hashlib.blake2b(raw, digest_size=32, person=_TENANT_PERSON).digest() if raw else b""
    tag = hashlib.blake2b(f"{name}\0{tenant_secret}".encode(), key=key, digest_size=16, person=_TENANT_PERSON)
    return f"{name}~{tag.hexdigest()}"


@dataclass(frozen=True)
class ChunkKey:
    """Hash over (model fingerprint, namespace, chunk context, token ids, shard).

    `context` says how the KV was computed: "alone" (from position 0) or "behind_prefix:<prefix hash>"
    (behind a shared prompt prefix); any difference in any field gives a different key. Every key kvblend
    makes comes from the constructors below (`alone`, `behind`), in a namespace from `key_namespace`.
    `shard` says which KV heads the entry holds: WHOLE (all), or a tensor-parallel rank's (`tp_shard`, made
    with `for_shard`), so a rank's shard is never another rank's or another world size's entry.
    """

    fingerprint: str
    namespace: str
    context: str
    tokens_hash: str
    num_tokens: int
    shard: str = WHOLE

    def __post_init__(self) -> None:
        if not self.fingerprint:
            raise ValueError("ChunkKey needs a model fingerprint")
        if not _KEY_NAMESPACE.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} must be 1-128 chars of [A-Za-z0-9._:-] (plus a tenant tag)")
        if self.context.split(":", 1)[0] not in CONTEXTS:
            raise ValueError(f"chunk context {self.context!r} must start with one of {CONTEXTS}")
        if self.num_tokens <= 0:
            raise ValueError("a chunk needs at least one token")
        if self.shard != WHOLE and not _SHARD.match(self.shard):
            raise ValueError(f"shard {self.shard!r} is not tp<world>.r<rank>.h<first>-<end>")

    @classmethod
    def for_tokens(
        cls, fingerprint: str, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE, context: str = ALONE
    ) -> "ChunkKey":
        """The key of `token_ids` whose KV was computed in `context` (see `alone` and `behind`)."""
        return cls(fingerprint, namespace, context, token_ids_hash(token_ids), len(token_ids))

    @classmethod
    def alone(cls, fingerprint: str, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> "ChunkKey":
        """The key of a chunk's KV computed alone, from position 0 (what blending reuses anywhere in a prompt)."""
        return cls.for_tokens(fingerprint, token_ids, namespace, ALONE)

    @classmethod
    def behind(cls, fingerprint: str, token_ids: Sequence[int], prefix_ids: Sequence[int] | None,
               namespace: str = DEFAULT_NAMESPACE) -> "ChunkKey":
        """The key of a chunk's KV computed behind `prefix_ids` (no prefix: the same as `alone`)."""
        return cls.for_tokens(fingerprint, token_ids, namespace, chunk_context(prefix_ids))

    def for_shard(self, shard: str) -> "ChunkKey":
        """The key of the same chunk's KV restricted to `shard` (a `tp_shard`; WHOLE: every head)."""
        return self if shard == self.shard else replace(self, shard=shard)

    @property
    def is_alone(self) -> bool:
        """Computed alone from position 0, so reusable wherever the tokens appear."""
        return self.context == ALONE

    @property
    def digest(self) -> str:
        """64 hex chars naming the entry in every tier."""
        fields = (KEY_VERSION, self.fingerprint, self.namespace, self.context, self.tokens_hash, str(self.num_tokens))
        blob = "\0".join(fields + ((self.shard,) if self.shard != WHOLE else ()))  # whole KV: the keys of before shards
        return hashlib.sha256(blob.encode()).hexdigest()

    def __str__(self) -> str:
        return self.digest


def prefix_chained_keys(fingerprint: str, token_ids: Sequence[int], span_tokens: int,
                        namespace: str = DEFAULT_NAMESPACE) -> list[ChunkKey]:
    """The key of each full `span_tokens` span of `token_ids` computed behind every token before it: exactly
    `ChunkKey.behind(fingerprint, span, token_ids[:start], namespace)` for each span, its prefix hash taken
    from one running sha256 over the ids (linear in their length, instead of hashing each prefix anew)."""
    if span_tokens <= 0:
        raise ValueError(f"span_tokens must be positive, got {span_tokens}")
    running, keys = hashlib.sha256(), []
    for start in range(0, len(token_ids) - span_tokens + 1, span_tokens):
        span = token_ids[start : start + span_tokens]
        keys.append(ChunkKey.for_tokens(fingerprint, span, namespace, _behind(running.hexdigest()) if start else ALONE))
        running.update(token_bytes(span))
    return keys
