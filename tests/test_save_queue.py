"""SaveQueue (kvblend.vllm.save_queue): spans copied on the compute stream reach the store intact from its thread,
in order, whether the pending budget holds two spans or less than one (submit then waits for each); close() stores
what is still queued. Needs CUDA."""

import pytest
import torch

from kvblend.store import StoreConfig, open_store
from kvblend.store.entry import ChunkKV
from kvblend.store.key import ChunkKey
from kvblend.vllm.save_queue import SaveQueue, pending_budget

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


SPAN_BYTES = 2 * 4 * 64 * 2 * 16 * 2  # K and V of one span below, bf16


@pytest.mark.parametrize("budget", [2 * SPAN_BYTES, 1])
def test_spans_reach_the_store_intact_off_the_compute_stream(budget):
    device = torch.device("cuda")
    assert 0 < pending_budget(device) <= 4 << 30
    stored = []
    gen = torch.Generator(device).manual_seed(0)
    spans = []
    with open_store(StoreConfig(memory_bytes=1 << 30)) as store:
        def put(key, k, v, ids, base_position):
            store.put(key, ChunkKV(key, k, v, torch.tensor(ids), base_position=base_position))
            stored.append((key, ids))

        saver = SaveQueue(device, put, budget)
        for i in range(6):
            ids = list(range(i * 64, i * 64 + 64))
            key = ChunkKey.alone("fingerprint", ids)
            k = torch.randn((4, 64, 2, 16), generator=gen, device=device, dtype=torch.bfloat16)
            v = torch.randn((4, 64, 2, 16), generator=gen, device=device, dtype=torch.bfloat16)
            spans.append((key, ids, k.cpu(), v.cpu()))
            saver.submit(key, k.clone(), v.clone(), ids, base_position=i * 64)
            k.zero_()  # the queue holds its own copy: later writes to the source rows do not reach the store
        saver.close()
        assert [key for key, _ in stored] == [key for key, *_ in spans]
        for key, ids, k, v in spans:
            entry = store.get(key)
            assert entry is not None
            assert torch.equal(entry.k, k) and torch.equal(entry.v, v) and entry.token_ids.tolist() == ids


def test_spans_submitted_as_slices_of_one_gather_reach_the_store_contiguous():
    """The worker submits a run of adjacent spans as row slices of one [layers, rows, ...] copy (save_groups)."""
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(1)
    k = torch.randn((4, 192, 2, 16), generator=gen, device=device, dtype=torch.bfloat16)
    v = torch.randn((4, 192, 2, 16), generator=gen, device=device, dtype=torch.bfloat16)
    with open_store(StoreConfig(memory_bytes=1 << 30)) as store:
        def put(key, hk, hv, ids, base_position):
            assert hk.is_contiguous() and hv.is_contiguous()
            store.put(key, ChunkKV(key, hk, hv, torch.tensor(ids), base_position=base_position))

        saver = SaveQueue(device, put)
        keys = []
        for i in range(3):
            ids = list(range(i * 64, i * 64 + 64))
            keys.append(ChunkKey.alone("fingerprint", ids))
            saver.submit(keys[-1], k[:, i * 64 : (i + 1) * 64], v[:, i * 64 : (i + 1) * 64], ids, base_position=i * 64)
        saver.close()
        for i, key in enumerate(keys):
            entry = store.get(key)
            assert torch.equal(entry.k, k[:, i * 64 : (i + 1) * 64].cpu())
            assert torch.equal(entry.v, v[:, i * 64 : (i + 1) * 64].cpu())
