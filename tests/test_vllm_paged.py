"""Whole-block copies into and out of vLLM's CPU paged cache (PagedCache.write_rows / read_rows_into) against
vLLM's own cache-update op, and the connector worker's storage-mode load and extraction on them: every span's
rows land where the op puts them, a damaged span fails the load (vLLM recomputes) and is counted as a miss."""

import pytest
import torch

pytest.importorskip("vllm")

from kvblend.store import DiskTier, MemoryTier, TieredStore  # noqa: E402
from kvblend.store.entry import ChunkKV, KVLayout, serialize  # noqa: E402
from kvblend.vllm.metadata import KVBlendMetadata, KVBlendWorkerMeta, LoadJob, SaveJob, Span  # noqa: E402
from kvblend.vllm.paged import PagedCache, slots_for  # noqa: E402
from kvblend.vllm.scheduler import prefix_spans  # noqa: E402
from test_store_helpers import SlowDisk  # noqa: E402
from vllm_helpers import cpu_attention_layers  # noqa: E402

BLOCK, HEADS, HEAD_DIM, LAYERS = 128, 3, 64, 3


def _cache(num_blocks: int = 8) -> PagedCache:
    layers, caches = cpu_attention_layers(1, num_blocks, BLOCK, HEADS, HEAD_DIM)
    name = next(iter(layers))
    return PagedCache(layers[name], caches[name], BLOCK, HEADS, HEAD_DIM)


def test_block_copies_match_vllm_op_and_read_back():
    gen = torch.Generator().manual_seed(0)
    block_ids = [5, 2, 7, 1]  # a request's blocks, out of order
    k, v = torch.randn(4 * BLOCK, HEADS, HEAD_DIM, generator=gen), torch.randn(4 * BLOCK, HEADS, HEAD_DIM, generator=gen)
    by_op, by_blocks = _cache(), _cache()
    assert by_blocks.k_tiles is not None  # this ISA's layout has tile views: the fast path is what is tested
    for start, end in [(0, 2 * BLOCK), (2 * BLOCK, 4 * BLOCK)]:
        by_op.write(k[start:end], v[start:end], slots_for(block_ids, start, end, BLOCK))
        by_blocks.write_rows(k[start:end], v[start:end], block_ids, start, end)
    assert torch.equal(by_op.kv, by_blocks.kv)
    out_k, out_v = torch.empty(3 * BLOCK, HEADS, HEAD_DIM), torch.empty(3 * BLOCK, HEADS, HEAD_DIM)
    by_blocks.read_rows_into(out_k, out_v, block_ids, BLOCK, 4 * BLOCK)
    assert torch.equal(out_k, k[BLOCK:]) and torch.equal(out_v, v[BLOCK:])
    part_k, part_v = torch.empty(100, HEADS, HEAD_DIM), torch.empty(100, HEADS, HEAD_DIM)
    by_blocks.read_rows_into(part_k, part_v, block_ids, 150, 250)  # not whole blocks: the gather path
    assert torch.equal(part_k, k[150:250]) and torch.equal(part_v, v[150:250])
    by_blocks.write_rows(-k[10:40], -v[10:40], block_ids, 10, 40)  # not whole blocks: vLLM's op
    by_op.write(-k[10:40], -v[10:40], slots_for(block_ids, 10, 40, BLOCK))
    assert torch.equal(by_op.kv, by_blocks.kv)
    with pytest.raises(ValueError):
        by_blocks.write_rows(k[:BLOCK], v[:BLOCK], block_ids, 0, 2 * BLOCK)


@pytest.mark.parametrize("physical", ["NHD", "HND"])
def test_gpu_backends_packed_layout_in_either_stride_order(physical):
    """vLLM's GPU backends' per-layer cache [blocks, kv_heads, block_size, 2 * head_dim], allocated in NHD or HND
    memory order: rows land where FLASH_ATTN's kernels read them (`kv_cache.transpose(1, 2).split(head_dim, -1)`,
    its forward's own views) and read back the same."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    block, blocks = 16, 6
    if physical == "NHD":  # vLLM's default: memory [blocks, block_size, kv_heads, 2 * head_dim]
        kv = torch.zeros(blocks, block, HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)
    else:
        kv = torch.zeros(blocks, HEADS, block, 2 * HEAD_DIM)
    layer = torch.nn.Module()
    layer.attn_backend = FlashAttentionBackend
    cache = PagedCache(layer, kv, block, HEADS, HEAD_DIM)
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(40, HEADS, HEAD_DIM, generator=gen), torch.randn(40, HEADS, HEAD_DIM, generator=gen)
    block_ids = [4, 1, 5]
    cache.write_rows(k, v, block_ids, 3, 43)
    key_cache, value_cache = kv.transpose(1, 2).split(HEAD_DIM, dim=-1)
    slots = slots_for(block_ids, 3, 43, block)
    assert torch.equal(key_cache[slots // block, slots % block], k)
    assert torch.equal(value_cache[slots // block, slots % block], v)
    out_k, out_v = torch.empty_like(k), torch.empty_like(v)
    cache.read_rows_into(out_k, out_v, block_ids, 3, 43)
    assert torch.equal(out_k, k) and torch.equal(out_v, v)
    assert int((kv != 0).sum()) == 2 * k.numel()  # nothing written outside those rows
    with pytest.raises(ValueError, match="unknown paged KV layout"):
        PagedCache(layer, torch.zeros(2, blocks, block, HEADS, HEAD_DIM), block, HEADS, HEAD_DIM)


def _packed_layers(num_layers, num_blocks):
    """FLASH_ATTN-shaped layers and caches (NHD memory order) in host memory: the GPU backends' layout, whose
    storage-mode loads stage through a `TensorLayerSource` and scatter with `PagedCache.write`."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    layers, caches = {}, {}
    for i in range(num_layers):
        name = f"model.layers.{i}.self_attn.attn"
        layers[name] = torch.nn.Module()
        layers[name].attn_backend = FlashAttentionBackend
        caches[name] = torch.zeros(num_blocks, BLOCK, HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)
    return layers, caches


def _worker(store, num_blocks, layout="cpu_attn", layerwise_loads=True, failure_policy="recompute"):
    from types import SimpleNamespace

    from kvblend.vllm.worker import WorkerSide

    spec = SimpleNamespace(num_kv_heads=HEADS, head_dim=HEAD_DIM, num_layers=LAYERS, dtype="float32")
    make = cpu_attention_layers if layout == "cpu_attn" else lambda n, b, *_: _packed_layers(n, b)
    layers, caches = make(LAYERS, num_blocks, BLOCK, HEADS, HEAD_DIM)
    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=BLOCK),
                             kv_transfer_config=SimpleNamespace(kv_load_failure_policy=failure_policy))
    worker = WorkerSide(spec, config, None, store, layers, blend=False, layerwise_loads=layerwise_loads)
    worker.register(caches)
    return worker, list(layers)


def _stored_spans(store, prompt, n, gen):
    spans = prefix_spans("fp-test", prompt, BLOCK, "default")[:n]
    entries = {}
    for span in spans:
        shape = (LAYERS, BLOCK, HEADS, HEAD_DIM)
        kv = ChunkKV(span.key, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
                     torch.tensor(prompt[span.start : span.end]), base_position=span.start)
        store.put(span.key, kv)
        entries[span.key.digest] = kv
    store.flush()
    return spans, entries


def _run_load(worker, names, job):
    worker.start_load(KVBlendMetadata(loads=[job]))
    for name in names:
        worker.wait_layer(name)


@pytest.mark.parametrize("layout", ["cpu_attn", "packed"])
def test_storage_load_writes_every_span_and_extraction_reads_them_back(tmp_path, layout):
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 5000, (4 * BLOCK + 20,), generator=gen).tolist()
    block_ids = [3, 6, 1, 4, 2]
    with TieredStore([MemoryTier(1 << 30), DiskTier(tmp_path / "kv", 1 << 30)]) as store:
        spans, entries = _stored_spans(store, prompt, 4, gen)
        worker, names = _worker(store, 8, layout)
        assert {c.kind for c in worker.caches} == {layout}
        # vLLM's cache holds span 0 and 40 rows of span 1: the load writes from row BLOCK + 40 on
        _run_load(worker, names, LoadJob("r", block_ids, spans[1:], BLOCK + 40))
        assert not worker.take_failed_blocks()
        for span in spans[1:]:
            want = entries[span.key.digest]
            first = max(span.start, BLOCK + 40)
            slots = slots_for(block_ids, first, span.end, BLOCK)
            for layer, cache in enumerate(worker.caches):
                k, v = cache.read(slots)
                kept = slice(first - span.start, None)
                assert torch.equal(k, want.k[layer, kept]) and torch.equal(v, want.v[layer, kept])
        assert not any(c.kv[block_ids[0]].any() for c in worker.caches)  # span 0's block was left alone
        skipped = slots_for(block_ids, BLOCK, BLOCK + 40, BLOCK)
        assert not any(c.read(skipped)[0].any() for c in worker.caches)  # nor the rows vLLM had of span 1
        held = entries[spans[1].key.digest]  # vLLM's own rows of span 1, so that extraction reads whole spans back
        for layer, cache in enumerate(worker.caches):
            cache.write_rows(held.k[layer, :40], held.v[layer, :40], block_ids, BLOCK, BLOCK + 40)
        with TieredStore([MemoryTier(1 << 30)]) as other:
            worker.store = other
            worker._save(SaveJob("s", prompt, block_ids, spans[1:]))
            for span in spans[1:]:
                got, want = other.get(span.key), entries[span.key.digest]
                assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
                assert got.base_position == span.start and got.token_ids.tolist() == prompt[span.start : span.end]


def test_loads_before_the_forward_land_one_request_after_another(tmp_path):
    """With whole-model CUDA graphs (no layer hooks) every load is written at start_load, a load at a time."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 5000, (3 * BLOCK + 7,), generator=gen).tolist()
    with TieredStore([MemoryTier(1 << 30)]) as store:
        spans, entries = _stored_spans(store, prompt, 3, gen)
        worker, _ = _worker(store, 8, "packed", layerwise_loads=False)
        jobs = [LoadJob("a", [5, 1, 7, 0], spans, 0), LoadJob("b", [2, 6, 3, 4], spans[:2], BLOCK // 2)]
        worker.start_load(KVBlendMetadata(loads=jobs))
        assert not worker._loads and not worker.take_failed_blocks()
        for job in jobs:
            for span in job.spans:
                first = max(span.start, job.write_from)
                slots = slots_for(job.block_ids, first, span.end, BLOCK)
                want = entries[span.key.digest]
                for layer, cache in enumerate(worker.caches):
                    k, v = cache.read(slots)
                    kept = slice(first - span.start, None)
                    assert torch.equal(k, want.k[layer, kept]) and torch.equal(v, want.v[layer, kept])


def test_storage_load_with_a_damaged_span_fails_and_counts_a_miss(tmp_path):
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 5000, (3 * BLOCK + 5,), generator=gen).tolist()
    block_ids = [0, 1, 2, 3]
    disk_dir = tmp_path / "kv"
    with TieredStore([MemoryTier(1 << 30), DiskTier(disk_dir, 1 << 30)]) as writer:
        spans, entries = _stored_spans(writer, prompt, 3, gen)
    disk = DiskTier(disk_dir, 1 << 30)
    blob = bytearray(serialize(entries[spans[1].key.digest]))
    blob[-3] ^= 0x10
    disk.path(spans[1].key).write_bytes(bytes(blob))
    with TieredStore([MemoryTier(1 << 30), disk]) as store:
        worker, names = _worker(store, 4)
        _run_load(worker, names, LoadJob("r", block_ids, spans, 0))
        assert worker.take_failed_blocks() == {0, 1, 2, 3}
        assert "load_error" in worker.worker_meta().reports["r"]
        stats = disk.stats()  # the prefetch read it first (corrupt, dropped), the load then missed it
        assert stats.corrupt == 1 and stats.misses == 2 and stats.hits == 2
        assert not disk.contains(spans[1].key)  # a bad entry is dropped
        assert not any(c.kv.any() for c in worker.caches)  # nothing written for a failed load


def test_layout_check_uses_the_model_layout(tmp_path):
    """A span stored by another model's layout is a miss for this worker, never written into its cache."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 5000, (BLOCK + 3,), generator=gen).tolist()
    span = Span(0, BLOCK, prefix_spans("fp-test", prompt, BLOCK, "default")[0].key)
    shape = (LAYERS + 1, BLOCK, HEADS, HEAD_DIM)
    with TieredStore([MemoryTier(1 << 30)]) as store:
        store.put(span.key, ChunkKV(span.key, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
                                    torch.tensor(prompt[:BLOCK])))
        worker, names = _worker(store, 2)
        assert KVLayout(LAYERS, HEADS, HEAD_DIM, "float32") != store.get(span.key).layout
        _run_load(worker, names, LoadJob("r", [0, 1], [span], 0))
        assert worker.take_failed_blocks() == {0, 1}


def test_save_groups_cut_adjacent_spans_at_the_byte_cap():
    from kvblend.vllm.save_queue import save_groups

    key = object()
    spans = [Span(0, 256, key), Span(256, 256, key), Span(512, 256, key), Span(1024, 256, key), Span(1280, 512, key)]
    groups = save_groups(spans, token_bytes=10, cap=5120)
    assert [[(s.start, s.end) for s in g] for g in groups] == [
        [(0, 256), (256, 512)],  # a third would pass the cap
        [(512, 768)],  # the next span is not adjacent
        [(1024, 1280)],
        [(1280, 1792)],  # larger than the cap with its neighbour: alone
    ]
    assert save_groups(spans, token_bytes=1) == [spans[:3], spans[3:]]
    assert save_groups([], token_bytes=1) == []


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_load_that_reads_slower_than_vllm_prefills_is_left_to_vllm(tmp_path, policy):
    """The worker times vLLM's forward between its layers' hooks (nothing runs between them here: an instant prefill) and its
    store times reads (of a disk that waits 50 ms a read): reading the two spans would cost more than vLLM
    recomputing their tokens, so the load is declined, its blocks reported as not loaded (vLLM recomputes them),
    nothing the step computed on top of them stored, and the report says why. Where vLLM fails a request whose
    load failed, nothing is declined."""
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 5000, (2 * BLOCK + 9,), generator=gen).tolist()
    block_ids = [4, 0, 2]
    with TieredStore([MemoryTier(1), SlowDisk(tmp_path / "kv", delay_s=0.05)]) as store:  # no entry fits in memory
        spans, _ = _stored_spans(store, prompt, 2, gen)
        worker, names = _worker(store, 8, failure_policy=policy)
        _run_load(worker, names, LoadJob("unmeasured", block_ids, spans, 0))  # nothing measured: loaded, disk timed
        reports = (worker.worker_meta() or KVBlendWorkerMeta()).reports
        assert store.meter.seconds_per_byte()["disk"] > 0 and not worker.take_failed_blocks()
        for name in names:  # vLLM's forward of 600 tokens that loads nothing: its layers' attention hooks
            worker.wait_layer(name, 600)
            worker.layer_saved(name)
        assert worker.prefill.value() is not None
        _run_load(worker, names, LoadJob("r", block_ids, spans, 0))
        with TieredStore([MemoryTier(1 << 30)]) as other:  # what the step computed on top of a declined load
            worker.store, kept = other, worker.store
            worker.after_step(KVBlendMetadata(saves=[SaveJob("r", prompt, block_ids, spans)]))
            stored = [s for s in spans if other.contains(s.key)]
            worker.store = kept
        reports.update((worker.worker_meta() or KVBlendWorkerMeta()).reports)
        if policy == "fail":
            assert not any("controller" in r for r in reports.values()) and not worker.take_failed_blocks()
            assert len(stored) == 2  # loaded, so the step's rows are exact and stored
            return
        assert not stored  # vLLM recomputes those rows: never stored
        assert reports["unmeasured"]["controller"]["reason"].endswith("not measured yet: load"), reports
        decision = reports["r"]["controller"]
        assert decision["recompute"] and decision["load_ms"] > 50 > decision["recompute_ms"], decision
        assert worker.take_failed_blocks() == set(block_ids) and not worker._loads
        assert worker.take_stats().data["counts"]["controller_decisions"] == {"storage_recompute": 1}
