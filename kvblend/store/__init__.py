"""Content-addressed chunk KV store: ChunkKey, safetensors entries, memory/disk/peer/Redis tiers, TieredStore."""

from kvblend.store.anchors import ChunkAnchorIndex
from kvblend.store.disk import DiskTier
from kvblend.store.entry import ChunkKV, EntryError, KVLayout, read_entry, serialize
from kvblend.store.key import ChunkKey
from kvblend.store.memory import MemoryTier
from kvblend.store.peer import PeerConfig, PeerTier
from kvblend.store.redis_tier import RedisConfig, RedisTier, redact_url, redacted_repr
from kvblend.store.tier import Tier, TierStats
from kvblend.store.tiered import StoreConfig, TieredStore, open_store

__all__ = [
    "ChunkAnchorIndex",
    "ChunkKV",
    "ChunkKey",
    "DiskTier",
    "EntryError",
    "KVLayout",
    "MemoryTier",
    "PeerConfig",
    "PeerTier",
    "RedisConfig",
    "RedisTier",
    "StoreConfig",
    "Tier",
    "TierStats",
    "TieredStore",
    "open_store",
    "read_entry",
    "redact_url",
    "redacted_repr",
    "serialize",
]
