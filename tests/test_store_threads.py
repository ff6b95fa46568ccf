"""The store's background threads run on every CPU the process may use, even when the thread that opened the store
is pinned to one core (as vLLM's CPU worker pins its main thread before kvblend's connector opens the store):
inheriting that pin made store writes and reads share the forward pass's master core."""

import os
import threading

import pytest

from kvblend.store import DiskTier, MemoryTier, TieredStore
from test_store_helpers import assert_same_kv, random_chunk

CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs thread affinity and at least two usable CPUs")


def _affinities(prefix: str) -> dict[str, set[int]]:
    return {t.name: os.sched_getaffinity(t.native_id) for t in threading.enumerate() if t.name.startswith(prefix)}


def _use_store_from_a_pinned_thread(tmp_path, seen: dict) -> None:
    os.sched_setaffinity(0, {min(CPUS)})
    kv = random_chunk(seed=3)
    with TieredStore([MemoryTier(1 << 30), DiskTier(tmp_path / "kv", 1 << 30)]) as store:
        store.put(kv.key, kv)
        store.flush()  # the writer thread has run
        store.tiers[0].delete(kv.key)
        assert store.prefetch([kv.key]).result() == 1  # a prefetch thread has run and promoted it from disk
        assert_same_kv(store.get(kv.key), kv)
        seen.update(_affinities("kvblend-store-writer"), **_affinities("kvblend-prefetch"))


def test_store_threads_are_not_pinned_to_the_core_of_the_thread_that_opened_the_store(tmp_path):
    seen, errors = {}, []

    def run():
        try:
            _use_store_from_a_pinned_thread(tmp_path, seen)
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)

    opener = threading.Thread(target=run)
    opener.start()
    opener.join()
    assert not errors, errors
    assert any(name.startswith("kvblend-store-writer") for name in seen)
    assert any(name.startswith("kvblend-prefetch") for name in seen)
    for name, cpus in seen.items():
        assert CPUS <= cpus, f"{name} runs on CPUs {sorted(cpus)}, the process on {sorted(CPUS)}"
