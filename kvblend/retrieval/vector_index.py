"""VectorIndex: a faiss inner-product index and its chunks, persisted together in one directory.

Layout of an index directory (a save writes a new generation, then switches to it by replacing the manifest):
    manifest.json          format, version, dim, kind, embedder name, counts, the current generation's files
    chunks-<gen>.jsonl     one chunk per line (its faiss id, the Chunk fields, token ids as a list)
    vectors-<gen>.faiss    faiss.write_index of the IndexIDMap2 (the vectors live only here)
Every file is written under a temporary name, fsynced and renamed, and the manifest is replaced last, so a
crash mid-save leaves the previous generation intact and current. No pickle anywhere.

kind "flat" is exact search (IndexFlatIP); "hnsw" is approximate (IndexHNSWFlat, inner product). HNSW cannot
remove vectors, so removal from an HNSW index rebuilds it from the remaining vectors (reconstructed from faiss).
Not thread-safe for writers: one process, one writer.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from kvblend.retrieval.chunker import Chunk

FORMAT = "kvblend-vector-index"
VERSION = 1
KINDS = ("flat", "hnsw")
MANIFEST = "manifest.json"
_GENERATION_FILE = re.compile(r"^(chunks-\d{6}\.jsonl|vectors-\d{6}\.faiss)$")
_TEMP_PREFIX = ".tmp-"
_CHUNK_FIELDS = {f.name for f in fields(Chunk)}


class IndexFormatError(ValueError):
    """A directory is not a usable kvblend index; the message names the path and the problem."""


def _new_faiss_index(dim: int, kind: str, hnsw_m: int):
    import faiss

    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    else:
        inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIDMap2(inner)


def _chunk_to_json(faiss_id: int, chunk: Chunk) -> str:
    record = asdict(chunk)
    record["token_ids"] = list(chunk.token_ids)
    return json.dumps({"id": faiss_id, **record}, ensure_ascii=False)


def _chunk_from_json(line: str, where: str) -> tuple[int, Chunk]:
    try:
        record = json.loads(line)
        faiss_id = int(record.pop("id"))
        record["token_ids"] = tuple(int(t) for t in record["token_ids"])
        if set(record) != _CHUNK_FIELDS:
            raise KeyError(f"fields {sorted(record)} != {sorted(_CHUNK_FIELDS)}")
        return faiss_id, Chunk(**record)
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{where}: not a chunk record ({exc})") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(target: Path, write) -> None:
    """Call write(temp_path) on a temporary file beside target, fsync it, then rename it over target."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX, suffix=target.suffix)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def check_embedder(path: str | os.PathLike, embedder_name: str, dim: int, embedder) -> None:
    """Refuse an embedder other than the one (name and dimension) whose vectors the index at `path` holds."""
    if embedder.name != embedder_name or embedder.dim != dim:
        raise ValueError(f"index {path} holds vectors of {embedder_name!r} (dim {dim}), not of {embedder.name!r} "
                         f"(dim {embedder.dim}); rebuild the index or use that embedder")


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no index at {path}: the directory does not exist")
    if not path.is_dir():
        raise IndexFormatError(f"{path} is not a kvblend index: it is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise IndexFormatError(f"{path} is not a kvblend index: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{manifest_path} is not a kvblend index manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IndexFormatError(
            f"{manifest_path} is not a kvblend index manifest (format {found!r}, expected {FORMAT!r})"
        )
    if manifest.get("version") != VERSION:
        raise IndexFormatError(
            f"{path} is a kvblend index of format version {manifest.get('version')!r}; this kvblend reads {VERSION}"
        )
    missing = [
        k
        for k in ("dim", "kind", "embedder", "chunks", "next_id", "generation", "hnsw_m", "ef_search")
        if k not in manifest
    ]
    if missing or manifest["kind"] not in KINDS:
        raise IndexFormatError(
            f"{manifest_path} is damaged: missing {missing} or unknown kind {manifest.get('kind')!r}"
        )
    return manifest


def _locked(method):
    """Run the method under the index's lock: searches (HNSW sets efSearch per search) and updates from several
    threads (a LangChain chain's `batch`, documents added while questions are answered) take turns."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class VectorIndex:
    """Chunks and their unit-norm embeddings; search by inner product (cosine similarity). Thread-safe."""

    def __init__(
        self,
        path: Path,
        dim: int,
        embedder_name: str,
        kind: str,
        hnsw_m: int,
        ef_search: int,
        faiss_index,
        chunks: dict[int, Chunk],
        next_id: int,
        generation: int,
    ) -> None:
        self.path = path
        self.dim = dim
        self.embedder_name = embedder_name
        self.kind = kind
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self._index = faiss_index
        self._chunks = chunks
        self._ids = {chunk.chunk_id: faiss_id for faiss_id, chunk in chunks.items()}
        self._next_id = next_id
        self._generation = generation
        self._lock = threading.RLock()

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        dim: int,
        embedder_name: str,
        kind: str = "flat",
        hnsw_m: int = 32,
        ef_search: int = 64,
    ) -> VectorIndex:
        """A new empty index, saved at once; the directory must not exist or be empty."""
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        if not embedder_name:
            raise ValueError("an index needs the name of the embedder that made its vectors")
        if hnsw_m <= 0 or ef_search <= 0:
            raise ValueError(f"hnsw_m and ef_search must be positive, got {hnsw_m} and {ef_search}")
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"cannot create an index at {path}: it is a file")
            if (path / MANIFEST).exists():
                raise FileExistsError(f"{path} already holds an index; open it with VectorIndex.open")
            if any(path.iterdir()):
                raise FileExistsError(f"cannot create an index in {path}: the directory is not empty")
        path.mkdir(parents=True, exist_ok=True)
        index = cls(path, dim, embedder_name, kind, hnsw_m, ef_search, _new_faiss_index(dim, kind, hnsw_m), {}, 0, 0)
        index.save()
        return index

    @classmethod
    def open(cls, path: str | os.PathLike, embedder=None) -> VectorIndex:
        """The index saved in `path`; with an embedder, refuses an index whose vectors another embedder made."""
        import faiss

        path = Path(path)
        manifest = _read_manifest(path)
        if embedder is not None:
            check_embedder(path, manifest["embedder"], manifest["dim"], embedder)
        generation = int(manifest["generation"])
        chunks_path, vectors_path = path / f"chunks-{generation:06d}.jsonl", path / f"vectors-{generation:06d}.faiss"
        for required in (chunks_path, vectors_path):
            if not required.is_file():
                raise IndexFormatError(f"index {path} is damaged: {required.name} is missing")
        chunks: dict[int, Chunk] = {}
        with open(chunks_path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                faiss_id, chunk = _chunk_from_json(line, f"{chunks_path}:{number}")
                chunks[faiss_id] = chunk
        try:
            faiss_index = faiss.read_index(str(vectors_path))
        except RuntimeError as exc:
            raise IndexFormatError(f"index {path} is damaged: cannot read {vectors_path.name}: {exc}") from exc
        ids = faiss.vector_to_array(faiss_index.id_map) if hasattr(faiss_index, "id_map") else None
        if (
            ids is None
            or faiss_index.d != manifest["dim"]
            or len(chunks) != manifest["chunks"]
            or sorted(ids.tolist()) != sorted(chunks)
        ):
            raise IndexFormatError(f"index {path} is damaged: {vectors_path.name} does not match {chunks_path.name}")
        return cls(
            path,
            manifest["dim"],
            manifest["embedder"],
            manifest["kind"],
            manifest["hnsw_m"],
            manifest["ef_search"],
            faiss_index,
            chunks,
            int(manifest["next_id"]),
            generation,
        )

    def check_embedder(self, embedder) -> None:
        """Refuse an embedder other than the one whose vectors this index holds."""
        check_embedder(self.path, self.embedder_name, self.dim, embedder)

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._ids

    def sources(self) -> list[str]:
        return sorted({chunk.source for chunk in self._chunks.values()})

    def chunks(self, source: str | None = None) -> list[Chunk]:
        """The stored chunks (of one source, when given) in document order."""
        found = [c for c in self._chunks.values() if source is None or c.source == source]
        return sorted(found, key=lambda c: (c.source, c.index))

    @_locked
    def add(self, chunks: Sequence[Chunk], embeddings: np.ndarray) -> int:
        """Add chunks with their embeddings (row i embeds chunks[i]); chunk ids already present are skipped."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"embeddings must be [{len(chunks)}, {self.dim}], got {list(vectors.shape)}")
        if not np.isfinite(vectors).all():
            raise ValueError("embeddings contain NaN or infinity")
        keep, seen = [], set()
        for row, chunk in enumerate(chunks):
            if chunk.chunk_id not in self._ids and chunk.chunk_id not in seen:
                keep.append(row)
                seen.add(chunk.chunk_id)
        if not keep:
            return 0
        ids = np.arange(self._next_id, self._next_id + len(keep), dtype=np.int64)
        self._index.add_with_ids(vectors[keep], ids)
        for faiss_id, row in zip(ids.tolist(), keep):
            self._chunks[faiss_id] = chunks[row]
            self._ids[chunks[row].chunk_id] = faiss_id
        self._next_id += len(keep)
        return len(keep)

    @_locked
    def remove_source(self, source: str) -> int:
        """Remove every chunk of `source`; returns how many were removed (HNSW: rebuilt without them)."""
        doomed = [faiss_id for faiss_id, chunk in self._chunks.items() if chunk.source == source]
        if not doomed:
            return 0
        if self.kind == "flat":
            self._index.remove_ids(np.asarray(doomed, dtype=np.int64))
        else:
            self._rebuild_without(set(doomed))
        for faiss_id in doomed:
            del self._ids[self._chunks.pop(faiss_id).chunk_id]
        return len(doomed)

    def _rebuild_without(self, doomed: set[int]) -> None:
        import faiss

        ids = faiss.vector_to_array(self._index.id_map)
        vectors = faiss.downcast_index(self._index.index).reconstruct_n(0, self._index.ntotal)
        keep = np.array([i not in doomed for i in ids.tolist()], dtype=bool)
        rebuilt = _new_faiss_index(self.dim, self.kind, self.hnsw_m)
        if keep.any():
            rebuilt.add_with_ids(np.ascontiguousarray(vectors[keep]), ids[keep])
        self._index = rebuilt

    @_locked
    def search(self, query_embedding: np.ndarray, k: int) -> list[tuple[Chunk, float]]:
        """Up to k (chunk, inner product) pairs, best first; fewer when the index holds fewer."""
        import faiss

        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        query = np.ascontiguousarray(query_embedding, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise ValueError(f"query embedding has dim {query.shape[1]}, the index {self.dim}")
        if not self._chunks:
            return []
        k = min(k, len(self._chunks))
        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = max(self.ef_search, k)
        scores, ids = self._index.search(query, k)
        return [(self._chunks[int(i)], float(s)) for s, i in zip(scores[0], ids[0]) if i != -1]

    @_locked
    def save(self) -> None:
        """Write a new generation of data files, switch the manifest to it, then delete older generations."""
        import faiss

        generation = self._generation + 1
        chunks_path = self.path / f"chunks-{generation:06d}.jsonl"
        vectors_path = self.path / f"vectors-{generation:06d}.faiss"
        ordered = faiss.vector_to_array(self._index.id_map).tolist()

        def write_chunks(temp: str) -> None:
            with open(temp, "w", encoding="utf-8") as fh:
                fh.writelines(_chunk_to_json(faiss_id, self._chunks[faiss_id]) + "\n" for faiss_id in ordered)

        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dim": self.dim,
            "kind": self.kind,
            "embedder": self.embedder_name,
            "chunks": len(self._chunks),
            "sources": len(self.sources()),
            "next_id": self._next_id,
            "generation": generation,
            "hnsw_m": self.hnsw_m,
            "ef_search": self.ef_search,
        }
        _write_atomic(chunks_path, write_chunks)
        _write_atomic(vectors_path, lambda temp: faiss.write_index(self._index, temp))
        _write_atomic(self.path / MANIFEST, lambda temp: Path(temp).write_text(json.dumps(manifest, indent=2) + "\n"))
        _fsync_dir(self.path)
        self._generation = generation
        for entry in self.path.iterdir():
            stale = _GENERATION_FILE.match(entry.name) and entry.name not in (chunks_path.name, vectors_path.name)
            if stale or entry.name.startswith(_TEMP_PREFIX):
                entry.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return (
            f"VectorIndex({str(self.path)!r}, kind={self.kind!r}, chunks={len(self)}, embedder={self.embedder_name!r})"
        )
