"""Moving chunk bytes between kvblend instances with existing engines: NIXL (UCX) for the bytes, Redis as the
directory of which live instance holds which blob.

Layering: kvblend.transport sits *below* kvblend.store. It moves opaque byte blobs named by a string and knows
nothing of chunk keys, entries, tiers or integrity; it imports nothing from kvblend outside it (its
`redis_client`, the Redis or Redis Cluster connection of a URL, serves the store's Redis tier too). kvblend.store.peer builds
the peer tier on top of it (names blobs by ChunkKey digest, verifies every fetched entry with the entry
format's BLAKE3 digests or MAC). nixl and redis are imported only when an endpoint or directory is opened.
"""

from kvblend.transport.directory import Holder, PeerDirectory
from kvblend.transport.nixl_endpoint import BlobRecord, NixlEndpoint, TransferFailed

__all__ = ["BlobRecord", "Holder", "NixlEndpoint", "PeerDirectory", "TransferFailed"]
