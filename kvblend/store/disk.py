"""Local-disk tier: one safetensors file per entry in a directory shared by the host's processes.

Writes are atomic (temp file + rename), so concurrent writers of one key leave one valid file. They are not
fsynced: the tier is a cache, and an fsync added milliseconds of the engine's cores to every saved span. A crash can then leave
under an entry's name a file whose data never reached the disk (empty, short, or zeros where delayed allocation
had not written it); its size check, header digest and layer digests reject it as any damaged entry (a counted
miss, removed; tests/test_store_tiers.py `test_disk_entry_torn_by_a_crash_is_a_removed_miss`). The byte
budget is enforced by evicting the least recently used files (mtime is bumped on every hit). Every read is
verified; a corrupt or truncated file is a miss, is removed and is logged. With a deployment secret, entries
are written with a MAC and files without a valid one are refused (and kept: a later put replaces them).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

from kvblend.store.entry import (
    ChunkKV,
    EntryBytes,
    EntryError,
    EntryRefused,
    FileSource,
    KVLayout,
    entry_parts,
    entry_codec,
    entry_secret,
    read_entry,
    read_pool,
    serialize_parts,
)
from kvblend.store.key import ChunkKey
from kvblend.store.tier import TierCounters, TierStats

log = logging.getLogger(__name__)
SUFFIX = ".kv.safetensors"
STALE_TMP_S = 3600  # a temp file this old belongs to a writer that died mid-write
_IOV_MAX = 1024  # Linux's bound on buffers per writev


class DiskTier:
    name = "disk"
    synchronous = False
    host_shared_prefetch = True

    def __init__(self, root: str | os.PathLike, max_bytes: int, secret: str | bytes | None = None,
                 codec: str = "full") -> None:
        if max_bytes <= 0:
            raise ValueError(f"disk tier budget must be positive, got {max_bytes}")
        self.secret, self.codec = entry_secret(secret), entry_codec(codec)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.counts = TierCounters()
        self._lock = threading.Lock()
        self._bytes = self._scan_bytes()

    def path(self, key: ChunkKey) -> Path:
        digest = key.digest
        return self.root / digest[:2] / (digest + SUFFIX)

    def _entries(self, tmp: bool = False) -> list[os.DirEntry]:
        """Entry files (or, with `tmp`, writers' temporary files) in every shard."""
        found = []
        for shard in os.scandir(self.root):
            if shard.is_dir() and len(shard.name) == 2:
                found.extend(e for e in os.scandir(shard.path)
                             if (e.name.startswith(".tmp-") if tmp else e.name.endswith(SUFFIX)))
        return found

    def _scan_bytes(self) -> int:
        total = 0
        for entry in self._entries():
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def get(self, key: ChunkKey, layers: Sequence[int] | None = None, expect: KVLayout | None = None) -> ChunkKV | None:
        """The entry (or `layers` of it), verified; None for a miss, a bad entry (removed) or one refused (kept)."""
        return self._get(key, layers, expect, parallel=True)

    def get_many(self, keys: Sequence[ChunkKey], expect: KVLayout | None = None) -> list[ChunkKV | None]:
        """Whole entries of `keys`, each verified as `get` verifies it, read and verified on `read_pool()`'s
        threads one entry per task (a load's spans overlap each other's reads and digests)."""
        if len(keys) < 2:
            return [self.get(key, None, expect) for key in keys]
        return list(read_pool().map(lambda key: self._get(key, None, expect, parallel=False), keys))

    def _get(self, key: ChunkKey, layers: Sequence[int] | None, expect: KVLayout | None, parallel: bool) -> ChunkKV | None:
        """`get`; `parallel`: a large entry's layers are read on several threads (False: on this one)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.counts.add("misses")
            return None
        except OSError as exc:
            log.warning("disk tier: cannot open %s: %s", path.name, exc)
            self.counts.add("errors", "misses")
            return None
        try:
            kv = read_entry(FileSource(fd), key, layers, os.fstat(fd).st_size, expect, self.secret, parallel)
        except EntryRefused as exc:
            log.warning("disk tier: refusing entry %s (kept): %s", path.name, exc)
            self.counts.add("corrupt", "misses")
            return None
        except EntryError as exc:
            log.warning("disk tier: dropping bad entry %s: %s", path.name, exc)
            self.counts.add("corrupt", "misses")
            self._remove(path)
            return None
        except OSError as exc:
            log.warning("disk tier: cannot read %s: %s", path.name, exc)
            self.counts.add("errors", "misses")
            return None
        finally:
            os.close(fd)
        try:
            os.utime(path)
        except OSError:
            pass
        self.counts.add("hits")
        return kv

    def put(self, key: ChunkKey, kv: ChunkKV) -> bool:
        return self.put_bytes(key, serialize_parts(kv, self.secret, self.codec))

    def put_bytes(self, key: ChunkKey, blob: bytes | EntryBytes) -> bool:
        """Write an already-serialised entry atomically (its parts in vectored writes to a temporary file, renamed
        into place); False (and a log line) if the disk refuses it. No fsync: see the module's docstring."""
        parts = entry_parts(blob)
        size = sum(memoryview(part).nbytes for part in parts)
        if size > self.max_bytes:
            return False
        path = self.path(key)
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                try:
                    _write_all(fd, parts)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("disk tier: cannot write %s: %s", path.name, exc)
            self.counts.add("errors")
            return False
        self.counts.add("puts")
        with self._lock:
            self._bytes += size
            over = self._bytes > self.max_bytes
        if over:
            self._evict(keep=path)
        return True

    def _evict(self, keep: Path) -> None:
        """Rescan (other processes write here too) and delete least recently used files until under budget,
        and temporary files that writers which died mid-write left behind."""
        for entry in self._entries(tmp=True):
            try:
                if entry.stat().st_mtime < time.time() - STALE_TMP_S:
                    self._remove(Path(entry.path))
            except FileNotFoundError:
                continue
        files = []
        for entry in self._entries():
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            if self._remove(path):
                total -= size
                self.counts.add("evictions")
        with self._lock:
            self._bytes = total

    def _remove(self, path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def contains(self, key: ChunkKey) -> bool:
        return self.path(key).is_file()

    def delete(self, key: ChunkKey) -> None:
        path = self.path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if self._remove(path):
            with self._lock:
                self._bytes -= size

    def prefetch(self, keys: Iterable[ChunkKey]) -> None:
        """Ask the kernel to start reading the files into the page cache."""
        for key in keys:
            try:
                fd = os.open(self.path(key), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def counters(self) -> TierStats:
        """Hit/miss/put counters only (cheap: no scan of the stored entries)."""
        return self.counts.snapshot()

    def stats(self) -> TierStats:
        entries = len(self._entries())
        with self._lock:
            held = self._bytes
        return self.counts.snapshot(entries, held)


def _write_all(fd: int, parts: tuple) -> None:
    """Write every buffer of `parts` to `fd`, in order (writev, resumed after a short write)."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
