"""The per-request quality gate (BlendConfig.gate_bound, kvblend.blend.gate) and the planted-fact task cases
(kvblend.eval.tasks): configuration, parsing and the decision without the model, the in-place raise on a small
random Llama; the gate on SmolLM2 (slow)."""

import random
from dataclasses import replace

import pytest
import torch
from tiny_models import stored_blend_case

from kvblend.blend.config import GATE_BOUND, BlendConfig
from kvblend.blend.gate import SIGNAL, GateReport, decide, gate_signals, relative_deviation, reuse_error
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


def test_signals_and_decision():
    """The signals of a request whose question attends to the tokens the selection leaves reused, and whose chunk
    KV moved far, are high, those of one attending to the kept tokens of barely moved KV low; the same bound
    raises the first and passes the second."""
    scores = torch.tensor([5.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    picked, extended = torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3])
    on_kept = torch.tensor([0.3, 0.3, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    on_reused = torch.tensor([0.01, 0.01, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    low = gate_signals(on_kept, torch.full((8,), 0.001), scores, picked, extended)
    high = gate_signals(on_reused, torch.full((8,), 0.1), scores, picked, extended)
    assert low["reused_attention"] == pytest.approx(0.06) and high["reused_attention"] == pytest.approx(0.6)
    assert high["reused_deviation_attention"] == pytest.approx(0.06) and low["chunk_attention"] == pytest.approx(0.66)
    assert low["unselected_mass"] == pytest.approx(6 / 15) and high["deviation"] == pytest.approx(0.1)
    assert low["marginal_mass"] == pytest.approx(2 / 15) and high["marginal_attention"] == pytest.approx(0.2)
    assert low[SIGNAL] < high[SIGNAL]
    bound = (low[SIGNAL] + high[SIGNAL]) / 2
    passed, raised = GateReport(bound, low), GateReport(bound, high)
    assert decide(passed, 0.15) == 0.15 and passed.decision == "pass" and SIGNAL in passed.reason
    assert decide(raised, 0.15) == 0.3 and raised.decision == "raised" and "raised in place to 0.3" in raised.reason
    full = GateReport(bound, high)
    assert decide(full, 0.6) == 1.0 and full.decision == "full_prefill"
    assert raised.as_dict()["ratio"] == 0.3 and raised.as_dict()["signals"][SIGNAL] == pytest.approx(high[SIGNAL])


def test_relative_deviation_is_zero_for_unchanged_kv_and_scale_free():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(20, 2, 16, generator=g), torch.randn(20, 2, 16, generator=g)
    dk, dv = torch.randn(20, 2, 16, generator=g), torch.randn(20, 2, 16, generator=g)
    assert torch.equal(relative_deviation(k, v, k, v), torch.zeros(20))
    dev = relative_deviation(k, v, k + 0.1 * dk, v + 0.1 * dv)
    assert (dev > 0).all() and torch.allclose(relative_deviation(3 * k, 3 * v, 3 * (k + 0.1 * dk), 3 * (v + 0.1 * dv)), dev)


def test_reuse_error_is_zero_for_unchanged_kv_and_grows_with_the_change():
    g = torch.Generator().manual_seed(1)
    T, heads, kv_heads, d = 40, 4, 2, 16
    q = torch.randn(5, heads, d, generator=g)
    k, v = torch.randn(T, kv_heads, d, generator=g), torch.randn(T, kv_heads, d, generator=g)
    rows, pos, q_pos = torch.arange(5, 30), torch.arange(T), torch.arange(T - 5, T)
    noise_k, noise_v = torch.randn(25, kv_heads, d, generator=g), torch.randn(25, kv_heads, d, generator=g)
    errors = [reuse_error(q, q_pos, k, v, rows, k[rows] + s * noise_k, v[rows] + s * noise_v, pos) for s in (0, 0.1, 1)]
    assert errors[0] == 0.0 and 0 < errors[1] < errors[2]


@pytest.fixture(scope="module")
def small():
    _, engine, layout = stored_blend_case(5)
    return engine, layout


def test_gate_raises_in_place_at_the_first_check_layer(small):
    """Unreachable bound: the blend is the ungated one, with the signals reported. Bound below the request's
    signal: exactly the blend at twice the ratio, at its compute (nothing wasted). A single check at ratio 0.5
    raised: every chunk token recomputed, a full prefill."""
    engine, layout = small
    off = engine.blend(layout, BlendConfig(gate_bound=None))
    watch = engine.blend(layout, BlendConfig(gate_bound=1e9))
    assert off.stats.gate is None and torch.equal(off.logits, watch.logits)
    gate = watch.stats.gate
    assert gate["decision"] == "pass" and gate["ratio"] == 0.15 and 0 < gate["signals"][SIGNAL] < 1
    signal = gate["signals"][SIGNAL]
    assert engine.blend(layout, BlendConfig(gate_bound=signal * 1.01)).stats.gate["decision"] == "pass"
    raised = engine.blend(layout, BlendConfig(gate_bound=signal * 0.99))
    doubled = engine.blend(layout, BlendConfig(ratio=0.3, gate_bound=None))
    assert raised.stats.gate["decision"] == "raised" and raised.stats.gate["ratio"] == 0.3
    assert torch.equal(raised.logits, doubled.logits) and raised.stats.tokens_reused == doubled.stats.tokens_reused
    assert raised.stats.token_layers_computed == doubled.stats.token_layers_computed
    single = BlendConfig(ratio=0.5, check_layers=(1,), gate_bound=1e9)
    high = engine.blend(layout, single).stats.gate["signals"][SIGNAL]
    full = engine.blend(layout, replace(single, gate_bound=high * 0.99))
    assert full.stats.gate["decision"] == "full_prefill" and full.stats.tokens_reused == 0


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
