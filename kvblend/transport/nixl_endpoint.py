"""One NIXL agent per instance: exports blobs from registered host memory and reads peers' blobs (UCX READ).

An exported blob is a copy in its own registered buffer, kept under a byte budget (LRU); its record (agent,
address, size, the partial NIXL metadata of its registration) is what a peer needs to read it. A withdrawn or
evicted blob stays registered for `retire_s` more, so a peer that looked it up just before can still finish
its read (a read of freed memory would crash this process). A read waits at most `timeout_s`; a peer that
errors or is too slow raises TransferFailed and is forgotten by the agent.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)
_POLL_S = 0.0002
T = TypeVar("T")


class TransferFailed(RuntimeError):
    """A peer read did not complete: the peer is gone, refused, errored or ran past its timeout."""


@dataclass(frozen=True)
class BlobRecord:
    """Where a peer's blob lives: what another agent needs to READ it."""

    agent: str
    addr: int
    size: int
    metadata: bytes  # NIXL partial agent metadata of the blob's registration

    def to_bytes(self) -> bytes:
        return json.dumps({"agent": self.agent, "addr": self.addr, "size": self.size,
                           "md": base64.b64encode(self.metadata).decode()}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> BlobRecord:
        """Parse a record; ValueError for anything that is not one."""
        try:
            d = json.loads(raw)
            record = cls(str(d["agent"]), int(d["addr"]), int(d["size"]), base64.b64decode(d["md"], validate=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a blob record: {exc!r}") from exc
        if record.size <= 0 or record.addr <= 0:
            raise ValueError(f"blob record with address {record.addr} and size {record.size}")
        return record


def _nixl_api():
    """nixl's Python API: the `nixl` package (vLLM's choice) or the CUDA-13 build `nixl_cu13` (same API)."""
    for name in ("nixl._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("the peer tier needs NIXL: pip install 'kvblend[transport]' (nixl-cu13)")


@dataclass
class _Export:
    buffer: np.ndarray
    registration: object  # the nixlRegDList to deregister


class NixlEndpoint:
    """This instance's NIXL agent (UCX backend, progress thread): exported blobs and reads from peers."""

    def __init__(self, name: str, max_bytes: int, retire_s: float = 30.0) -> None:
        if max_bytes <= 0 or retire_s < 0:
            raise ValueError(f"peer export budget must be positive and retire_s not negative, got {max_bytes}, {retire_s}")
        api = _nixl_api()
        config = api.nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"],
                                       sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = api.nixl_agent(name, config)
        self._api = api
        if "UCX" not in self.agent.backends:
            raise RuntimeError("NIXL has no UCX backend here; the peer tier needs it")
        self.name, self.max_bytes, self.retire_s = name, max_bytes, retire_s
        self._exports: OrderedDict[str, _Export] = OrderedDict()
        self._retired: list[tuple[float, _Export]] = []  # (deregister after, export), oldest first
        self._bytes = 0
        self._remotes: dict[str, tuple[bytes, set[bytes]]] = {}  # agent -> its connection info, blob metadata loaded
        self._staging: np.ndarray | None = None
        self._staging_reg = None
        self._abandoned: list[np.ndarray] = []  # buffers a cancelled read may still write into: never reused
        self._lock = threading.Lock()

    def connection_info(self) -> bytes:
        """NIXL metadata with this agent's connection info and no memory (published once, in the directory)."""
        return self.agent.get_partial_agent_metadata(self._api.nixlBind.nixlRegDList(self._api.nixlBind.DRAM_SEG),
                                                     True, ["UCX"])

    def export(self, name: str, blob: bytes) -> tuple[BlobRecord | None, list[str]]:
        """Copy `blob` into registered memory as `name`: its record (None: larger than the budget) and the
        names evicted to make room (the caller withdraws them from the directory)."""
        if len(blob) > self.max_bytes:
            return None, []
        buffer = np.empty(len(blob), dtype=np.uint8)
        buffer[:] = np.frombuffer(blob, dtype=np.uint8)
        addr = buffer.ctypes.data
        with self._lock:
            self._sweep()
            registration = self.agent.register_memory([(addr, buffer.nbytes, 0, "")], "DRAM", ["UCX"])
            metadata = self.agent.get_partial_agent_metadata(registration, False, ["UCX"])
            record = BlobRecord(self.name, addr, buffer.nbytes, metadata)
            self._drop(name)
            evicted = []
            self._exports[name] = _Export(buffer, registration)
            self._bytes += buffer.nbytes
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._exports))
                self._drop(oldest)
                evicted.append(oldest)
        return record, evicted

    def withdraw(self, name: str, exported: memoryview | None = None) -> bool:
        """Stop exporting `name` (when `exported` is given: only if that is still the blob exported under it, not
        a newer export of the same name); whether it was withdrawn."""
        with self._lock:
            current = self._exports.get(name)
            mine = current is not None and (exported is None or exported.obj is current.buffer)
            if mine:
                self._drop(name)
            self._sweep()
        return mine

    def _drop(self, name: str) -> None:
        """Stop exporting `name`; its memory stays registered for retire_s."""
        old = self._exports.pop(name, None)
        if old is not None:
            self._bytes -= old.buffer.nbytes
            self._retired.append((time.monotonic() + self.retire_s, old))

    def _sweep(self, everything: bool = False) -> None:
        """Deregister and free retired blobs whose grace period is over (all of them when closing)."""
        now = time.monotonic()
        while self._retired and (everything or self._retired[0][0] <= now):
            _, old = self._retired.pop(0)
            self.agent.deregister_memory(old.registration, ["UCX"])

    def local(self, name: str) -> memoryview | None:
        """This instance's own exported blob `name` (no transfer needed), if it holds one."""
        with self._lock:
            export = self._exports.get(name)
            if export is None:
                return None
            self._exports.move_to_end(name)
            return memoryview(export.buffer)

    def exported(self) -> list[str]:
        with self._lock:
            return list(self._exports)

    def exported_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def read(self, record: BlobRecord, connection_info: bytes, timeout_s: float, use: Callable[[memoryview], T]) -> T:
        """`use(blob)` of the blob `record` names, read from its agent over NIXL (UCX READ) within `timeout_s`
        into a reused registered buffer (valid only during `use`); TransferFailed if the read does not complete
        (the remote agent is then forgotten, so a restarted peer starts afresh)."""
        with self._lock:
            try:
                view = self._read(record, connection_info, time.monotonic() + timeout_s)
            except TransferFailed:
                self._forget(record.agent)
                raise
            except Exception as exc:  # whatever NIXL raises for a bad or vanished peer is a failed transfer
                self._forget(record.agent)
                raise TransferFailed(f"NIXL read from {record.agent} failed: {exc!r}") from exc
            return use(view)

    def _read(self, record: BlobRecord, connection_info: bytes, deadline: float) -> memoryview:
        if record.size > self.max_bytes:  # a record is only as trustworthy as the directory: bound the buffer
            raise TransferFailed(f"{record.agent} offers a {record.size}-byte blob, over this endpoint's budget")
        known = self._remotes.get(record.agent)
        if known is not None and known[0] != connection_info:  # the same name restarted: a new agent
            self._forget(record.agent)
            known = None
        if known is None:
            self.agent.add_remote_agent(connection_info)
            known = self._remotes[record.agent] = (connection_info, set())
        if record.metadata not in known[1]:
            self.agent.add_remote_agent(record.metadata)
            known[1].add(record.metadata)
        staging = self._stage(record.size)
        local = self.agent.get_xfer_descs([(staging.ctypes.data, record.size, 0)], "DRAM")
        remote = self.agent.get_xfer_descs([(record.addr, record.size, 0)], "DRAM")
        handle = self.agent.initialize_xfer("READ", local, remote, record.agent)
        state = self.agent.transfer(handle)
        while state == "PROC" and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            state = self.agent.check_xfer_state(handle)
        if state == "DONE":
            handle.release()
            return memoryview(staging)[: record.size]
        self._abandon(handle)
        what = "timed out" if state == "PROC" else "failed"
        raise TransferFailed(f"NIXL read of {record.size} bytes from {record.agent} {what}")

    def _stage(self, size: int) -> np.ndarray:
        """A registered buffer of at least `size` bytes, reused between reads."""
        if self._staging is None or self._staging.nbytes < size:
            if self._staging_reg is not None:
                self.agent.deregister_memory(self._staging_reg, ["UCX"])
            self._staging = np.empty(size, dtype=np.uint8)
            self._staging_reg = self.agent.register_memory([(self._staging.ctypes.data, size, 0, "")], "DRAM", ["UCX"])
        return self._staging

    def _abandon(self, handle) -> None:
        """Cancel an unfinished read; its staging buffer is never reused (the read may still land in it)."""
        try:
            handle.release()
        except Exception as exc:  # noqa: BLE001 - a read NIXL cannot cancel leaves its buffer retired, nothing more
            log.warning("peer transfer: cannot cancel a NIXL read (%r); its buffer is retired", exc)
        if self._staging is not None:
            self._abandoned.append(self._staging)
            self._staging, self._staging_reg = None, None

    def _forget(self, agent: str) -> None:
        if self._remotes.pop(agent, None) is not None:
            try:
                self.agent.remove_remote_agent(agent)
            except Exception as exc:  # noqa: BLE001 - forgetting a peer NIXL already dropped is not an error
                log.debug("peer transfer: forgetting %s: %r", agent, exc)

    def close(self) -> None:
        """Deregister every export at once (the caller has left the directory); the agent is released with
        this object."""
        with self._lock:
            for name in list(self._exports):
                self._drop(name)
            self._sweep(everything=True)
            if self._staging_reg is not None:
                self.agent.deregister_memory(self._staging_reg, ["UCX"])
                self._staging, self._staging_reg = None, None
