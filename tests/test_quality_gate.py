"""The per-request quality gate (BlendConfig.gate_bound, kvblend.blend.gate) and the planted-fact task cases
(kvblend.eval.tasks): configuration and parsing without the model; the gate on SmolLM2 (slow)."""

import random

import pytest
import torch

from kvblend.blend.config import GATE_BOUND, BlendConfig
from kvblend.blend.gate import question_attention_error, unselected_mass
from kvblend.eval.tasks import TEMPLATES, exact_match, plant, planted_cases, task_templates, token_f1
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.params import parse_params


def test_gate_is_off_by_default_and_validated():
    assert BlendConfig().gate_bound is None and BlendConfig(gate_bound=GATE_BOUND).gate_bound == GATE_BOUND > 0
    assert BlendConfig.published().gate_bound is None
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="gate_bound"):
            BlendConfig(gate_bound=bad)


def test_request_and_connector_gate_bounds():
    connector = ConnectorConfig(gate_bound=GATE_BOUND)
    assert connector.blend_config().gate_bound == GATE_BOUND
    assert ConnectorConfig().blend_config().gate_bound is None
    params = parse_params({"kvblend": {"gate_bound": 0.05}}, prompt_len=10)
    assert connector.blend_config(params.policy, params.ratio, params.gate_bound).gate_bound == 0.05
    off = parse_params({"kvblend": {"gate_bound": "off"}}, prompt_len=10)
    assert connector.blend_config(off.policy, off.ratio, off.gate_bound).gate_bound is None
    assert parse_params({}, prompt_len=10).gate_bound is None  # not given: the connector's
    for bad in (0, -0.1, "high", True):
        with pytest.raises(ValueError, match="gate_bound"):
            parse_params({"kvblend": {"gate_bound": bad}}, prompt_len=10)


def test_question_attention_error_is_zero_without_drops_and_grows_with_them():
    g = torch.Generator().manual_seed(0)
    T, heads, kv_heads, d = 40, 4, 2, 16
    q = torch.randn(5, heads, d, generator=g)
    k, v = torch.randn(T, kv_heads, d, generator=g), torch.randn(T, kv_heads, d, generator=g)
    old_k, old_v = k + 0.5 * torch.randn(T, kv_heads, d, generator=g), v + 0.5 * torch.randn(T, kv_heads, d, generator=g)
    pos, q_pos = torch.arange(T), torch.arange(T - 5, T)
    none = question_attention_error(q, q_pos, k, v, old_k, old_v, torch.empty(0, dtype=torch.int64), pos)
    some = question_attention_error(q, q_pos, k, v, old_k, old_v, torch.arange(0, 10), pos)
    most = question_attention_error(q, q_pos, k, v, old_k, old_v, torch.arange(0, 34), pos)
    assert none == 0.0 and 0.0 < some < most
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert unselected_mass(scores, torch.tensor([0, 1])) == pytest.approx(0.3)


def test_task_scoring():
    assert exact_match("The access code for project Ember is 3192.", "3192")
    assert exact_match("It is based in Lisbon", "lisbon") and not exact_match("Lisbonne", "Lisbon")
    assert exact_match("Maria Lopez leads it.", "Maria Lopez") and not exact_match("Maria", "Maria Lopez")
    assert token_f1("3192", "3192") == 1.0 and token_f1("the code is 3192", "3192") == pytest.approx(0.5)
    assert token_f1("no", "3192") == 0.0
    with pytest.raises(ValueError, match="unknown fact templates"):
        task_templates("code,nope")
    assert [t.kind for t in task_templates("city,code")] == ["city", "code"]


def test_planted_fact_sits_in_exactly_one_chunk(tokenizer):
    from kvblend.eval.fidelity import CaseSpec

    rng = random.Random(0)
    base = [CaseSpec(tuple(tuple(rng.randrange(1000, 2000) for _ in range(128)) for _ in range(3)), "q", ("a", "b", "c"))
            for _ in range(len(TEMPLATES))]
    cases, facts = planted_cases(tokenizer, base, seed=1)
    for case, fact, before in zip(cases, facts, base):
        assert all(len(c) == 128 for c in case.chunks)
        changed = [i for i, (a, b) in enumerate(zip(case.chunks, before.chunks)) if a != b]
        assert changed == [fact.chunk] and case.answer == fact.answer and fact.answer
        assert fact.answer in tokenizer.decode(list(case.chunks[fact.chunk]))
    with pytest.raises(ValueError, match="does not fit"):
        plant(tokenizer, list(range(1000, 1010)), "The access code for project Orion is 4817.", rng)


@pytest.mark.slow
def test_gate_decisions_on_smollm2(model_fp32, tokenizer):
    """An unreachable bound changes nothing but the report; above the bound at the last check layer the request
    restarts at twice its ratio, above twice the bound as a full prefill (which then matches a plain prefill);
    the stopped attempt's compute is counted."""
    from kvblend.blend.engine import BlendEngine
    from kvblend.blend.layout import ChunkRef
    from kvblend.blend.prompt import chat_template
    from kvblend.model.tokenizer import encode
    from kvblend.rag.precompute import chunk_key, compute_chunk_kv, token_windows
    from kvblend.retrieval.corpus import pydoc_topics
    from kvblend.store import MemoryTier, TieredStore

    store = TieredStore([MemoryTier(1 << 30)])
    refs = []
    for doc in pydoc_topics(["exceptions", "import", "execmodel"]):
        ids = tuple(token_windows(encode(tokenizer, doc.text), 64)[1])
        key = chunk_key(model_fp32, ids)
        store.put(key, compute_chunk_kv(model_fp32, key, ids))
        refs.append(ChunkRef(ids, key))
    layout = chat_template(tokenizer).layout(tokenizer, refs, "What happens when an exception is raised?")
    engine = BlendEngine(model_fp32, store)
    off = engine.blend(layout, BlendConfig(gate_bound=None))
    watch = engine.blend(layout, BlendConfig(gate_bound=float("inf")))
    assert off.stats.gate is None and torch.equal(off.logits, watch.logits)
    gate = watch.stats.gate
    assert gate["decision"] == "pass" and [c["layer"] for c in gate["checks"]] == [1, 3]
    assert all(c["error"] > 0 and 0 < c["reused_attention"] < 1 and 0 <= c["agreement"] <= 1 for c in gate["checks"])
    err = gate["checks"][-1]["error"]

    raised = engine.blend(layout, BlendConfig(gate_bound=err * 0.75))
    doubled = engine.blend(layout, BlendConfig(ratio=0.3, gate_bound=None))
    assert raised.stats.gate["decision"] == "raised" and "restarted as ratio 0.3" in raised.stats.gate["reason"]
    assert torch.equal(raised.logits, doubled.logits) and raised.stats.tokens_reused == doubled.stats.tokens_reused
    assert raised.stats.compute_fraction > doubled.stats.compute_fraction

    fallback = engine.blend(layout, BlendConfig(gate_bound=err / 3))
    assert fallback.stats.gate["decision"] == "full_prefill" and fallback.stats.tokens_reused == 0
    assert fallback.stats.compute_fraction > 1.0
    full = model_fp32.prefill(layout.token_ids(), logits_at=torch.tensor([layout.num_tokens - 1]))
    assert torch.allclose(fallback.logits, full.logits, atol=1e-3)
