"""The loading controller: its rule on given speeds, and its decisions from speeds measured on real tiers, one
of them a disk tier made deliberately slow; for storage mode, whether to read a stored prefix or let vLLM recompute
it (the worker's side of it: tests/test_vllm_paged.py)."""

import time

import pytest
import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.controller import LoadController, MeasuredRate, decide, decide_storage
from kvblend.store import MemoryTier, RedisConfig, RedisTier, TieredStore
from kvblend.store.entry import KVLayout
from test_store_helpers import SHAPE, SlowDisk, random_chunk

CONFIG = BlendConfig(ratio=0.15)
LAYOUT = KVLayout(SHAPE["layers"], SHAPE["heads"], SHAPE["head_dim"], "bfloat16")


def _decide(load_ms: float, overlap: bool, holders=("disk",), config=CONFIG, compute_us=10.0, chunk=1000, fixed=100):
    """Decision for `chunk` chunk tokens and `fixed` other tokens, a tier loading a layer in `load_ms` and
    compute of `compute_us` per token-layer."""
    bytes_per_layer = 1 << 20
    speeds = {"disk": load_ms / 1e3 / bytes_per_layer, "redis": 2 * load_ms / 1e3 / bytes_per_layer}
    return decide(list(holders), speeds, bytes_per_layer, chunk, fixed, compute_us / 1e6, config, overlap)


def test_overlapped_load_raises_the_ratio_until_compute_hides_it():
    cheap = _decide(load_ms=1.0, overlap=True)  # compute at 0.15 is (100 + 150) * 10us = 2.5 ms > 1 ms
    assert (cheap.tier, cheap.ratio, cheap.recompute) == ("disk", 0.15, False)
    slow = _decide(load_ms=6.0, overlap=True)  # compute = load at (600 - 100) / 1000 = 0.5
    assert slow.tier == "disk" and not slow.recompute and slow.ratio == pytest.approx(0.5)
    assert slow.compute_ms_per_layer == pytest.approx(slow.load_ms_per_layer)
    assert slow.apply(CONFIG).ratio == pytest.approx(0.5) and slow.apply(CONFIG).policy == "cacheblend"
    hopeless = _decide(load_ms=12.0, overlap=True)  # more than recomputing all 1100 tokens (11 ms)
    assert hopeless.recompute and hopeless.apply(CONFIG).policy == "full_prefill"


def test_load_in_line_keeps_the_ratio_or_recomputes():
    kept = _decide(load_ms=6.0, overlap=False)  # 6 + 2.5 < 11: loading still pays
    assert (kept.tier, kept.ratio, kept.recompute) == ("disk", 0.15, False)
    assert _decide(load_ms=9.0, overlap=False).recompute  # 9 + 2.5 >= 11


def test_fastest_measured_tier_wins_and_unmeasured_tiers_get_measured():
    assert _decide(load_ms=1.0, overlap=True, holders=("disk", "redis")).tier == "disk"
    assert _decide(load_ms=1.0, overlap=True, holders=("redis",)).tier == "redis"
    fresh = decide(["memory", "disk"], {"disk": 1e-9}, 1 << 20, 1000, 100, 1e-5, CONFIG, True)
    assert fresh.tier == "memory" and fresh.ratio == 0.15  # memory never read yet: try it
    spread = decide([], {}, 1 << 20, 1000, 100, 1e-5, CONFIG, True)
    assert spread.tier is None and not spread.recompute and spread.ratio == 0.15
    assert decide(["disk"], {"disk": 1e-9}, 1 << 20, 1000, 100, None, CONFIG, True).ratio == 0.15
    scheduled = BlendConfig(ratio=0.15, check_layers=(1, 3), schedule=(0.5, 0.15))
    assert _decide(load_ms=6.0, overlap=True, config=scheduled).ratio == 0.15  # an explicit schedule is kept


def test_controller_measures_a_deliberately_slow_tier_and_avoids_it(tmp_path, redis_url, redis_prefix):
    slow = SlowDisk(tmp_path / "kv", delay_s=0.05)
    redis = RedisTier(RedisConfig(redis_url, prefix=redis_prefix, timeout_s=2.0))
    chunks = [random_chunk(seed=s) for s in range(3)]
    with TieredStore([MemoryTier(1 << 30), slow, redis]) as store:
        for kv in chunks:
            slow.put(kv.key, kv)
            redis.put(kv.key, kv)
        keys = [kv.key for kv in chunks]
        controller = LoadController(store, LAYOUT, overlap=True)
        tokens = sum(kv.key.num_tokens for kv in chunks)
        first = controller.plan(keys, tokens, 20, CONFIG)
        assert first.tier == "disk" and "not measured" in first.reason  # fastest-ordered holder, unmeasured
        for key in keys:  # one layer-sliced read from each tier measures both
            assert store.get(key, layers=(0,), tier="disk") is not None
            assert store.get(key, layers=(0,), tier="redis") is not None
        speeds = store.meter.seconds_per_byte()
        assert speeds["disk"] > speeds["redis"]
        controller.observe({"qkv": 1e3, "attention": 1e3, "mlp": 2e3}, token_layers=4000)  # 1 ms per token-layer
        chosen = controller.plan(keys, tokens, 20, CONFIG)
        assert chosen.tier == "redis" and not chosen.recompute and chosen.ratio >= 0.15, chosen
        redis.delete(keys[0])
        only_slow = controller.plan(keys, tokens, 20, CONFIG)
        # A layer of the 3 chunks from the slow disk takes ~150 ms; recomputing all 71 tokens of a layer ~71 ms.
        assert only_slow.tier == "disk" and only_slow.recompute and only_slow.load_ms_per_layer > 50
        assert only_slow.as_dict()["recompute"] is True


def test_a_prefetch_in_flight_counts_as_held_by_memory(tmp_path):
    slow = SlowDisk(tmp_path / "kv", delay_s=0.3)
    kv = random_chunk(seed=4)
    with TieredStore([MemoryTier(1 << 30), slow]) as store:
        slow.put(kv.key, kv)
        assert store.fastest_holder(kv.key) == "disk" and store.fastest_holder(random_chunk(seed=9).key) is None
        future = store.prefetch([kv.key])
        assert store.holders([kv.key]) == ["memory", "disk"] and store.fastest_holder(kv.key) == "memory"
        start = time.monotonic()
        assert store.get(kv.key, layers=(1,), tier="memory") is not None  # waits for the prefetch, then hits
        assert time.monotonic() - start > 0.1 and future.result() == 1
        assert slow.counters().hits == 1  # the disk was read once, by the prefetch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_gpu_timed_blend_counts_its_device_time_once_it_has_run():
    """On a GPU a blend's compute is the device time between its events (host stage times there are launch
    times), folded in at a plan once the device passed the end event, never waited for."""
    kv = random_chunk(seed=5)
    with TieredStore([MemoryTier(1 << 30)]) as store:
        store.put(kv.key, kv)
        assert store.get(kv.key, layers=(0,), tier="memory") is not None  # measures the memory tier
        controller = LoadController(store, LAYOUT, overlap=True)
        a = torch.randn(4096, 4096, device="cuda")
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda._sleep(1 << 28)  # ~0.1 s of device time the events queue behind
        start.record()
        for _ in range(20):
            a = a @ a / 64
        end.record()
        controller.observe_events(start, end, token_layers=1000)
        early = controller.plan([kv.key], kv.key.num_tokens, 20, CONFIG)
        ran = end.query()
        torch.cuda.synchronize()
        late = controller.plan([kv.key], kv.key.num_tokens, 20, CONFIG)
    assert ran or early.reason == "recompute time not measured yet", early
    device_s = start.elapsed_time(end) / 1e3
    want_ms = device_s / 1000 * (20 + late.ratio * kv.key.num_tokens) * 1e3
    assert late.compute_ms_per_layer == pytest.approx(want_ms, rel=1e-6), late


def test_storage_loads_unless_measured_reads_cost_more_than_the_measured_prefill():
    """Two 1 MiB spans of 256 tokens each on disk: unmeasured speeds load (and so get measured); then the
    prefix is recomputed exactly when reading it costs more than vLLM prefilling its 512 tokens."""
    tiers, sizes = ["disk", "disk"], [1 << 20] * 2
    assert not decide_storage(tiers, sizes, {}, 512, 1e-4).recompute
    assert not decide_storage(tiers, sizes, {"disk": 1e-9}, 512, None).recompute
    assert not decide_storage(["memory", None], sizes, {"memory": 1e-12}, 512, 1e-4).recompute  # a tier unknown
    slow = decide_storage(tiers, sizes, {"disk": 1e-8}, 512, 1e-5)  # 21 ms of reads, 5.1 ms of prefill
    assert slow.recompute and slow.load_ms == pytest.approx(20.97, rel=1e-3) and slow.recompute_ms == pytest.approx(5.12)
    fast = decide_storage(["memory", "disk"], sizes, {"memory": 1e-11, "disk": 1e-9}, 512, 1e-5)
    assert not fast.recompute and fast.load_ms < fast.recompute_ms


def test_measured_rate_is_a_moving_average_per_unit():
    rate = MeasuredRate()
    assert rate.value() is None
    rate.observe(2.0, 1000)
    rate.observe(1.0, 0)  # nothing measured: ignored
    assert rate.value() == pytest.approx(2e-3)
    rate.observe(1.0, 1000)
    assert rate.value() == pytest.approx(0.7 * 2e-3 + 0.3 * 1e-3)
