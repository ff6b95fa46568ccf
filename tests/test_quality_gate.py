"""The per-request quality gate (BlendConfig.gate_bound, kvblend.blend.gate) and the planted-fact task cases
(kvblend.eval.tasks): configuration, parsing and the decision without the model, the in-place raise on a small
random Llama; the gate on SmolLM2 (slow)."""

import random

import pytest
import torch
from tiny_models import stored_blend_case

from kvblend.blend.config import BlendConfig
from kvblend.blend.gate import (
    DEFAULT_GATE_BOUND,
    FALLBACK_SIGNAL,
    RAISE_BOUND,
    RAISE_SIGNAL,
    GateReport,
    decide,
    fall_back,
    gate_signals,
    kv_mismatch,
    relative_deviation,
    reuse_error,
)
from kvblend.eval.tasks import TEMPLATES, exact_match, plant, planted_cases, task_templates, token_f1
from kvblend.rag.precompute import chunk_key, compute_chunk_kv
from kvblend.store.entry import ChunkKV
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.params import parse_params


def test_gate_is_on_by_default_at_the_documented_bound_and_validated():
    assert (DEFAULT_GATE_BOUND, RAISE_BOUND) == (0.01, 0.0104)
    config = BlendConfig()
    assert config.gate_bound == DEFAULT_GATE_BOUND and config.gate_raise is None and not config.gate_calibration
    assert BlendConfig(gate_raise=RAISE_BOUND).gated and not BlendConfig(gate_bound=None).gated
    assert BlendConfig.published().gate_bound is None
    for name in ("gate_bound", "gate_raise"):
        for bad in (0.0, -1.0, float("nan"), True, "0.03"):
            with pytest.raises(ValueError, match=f"{name} must be a number > 0"):
                BlendConfig(**{name: bad})
    assert BlendConfig(gate_bound=None, gate_raise=0.05).gated  # the raise alone


def test_request_and_connector_gate_bounds():
    connector = ConnectorConfig(gate_bound=0.04, gate_raise=RAISE_BOUND)
    assert (connector.blend_config().gate_bound, connector.blend_config().gate_raise) == (0.04, RAISE_BOUND)
    assert ConnectorConfig().blend_config().gate_bound == DEFAULT_GATE_BOUND
    assert ConnectorConfig().blend_config().gate_raise is None
    params = parse_params({"kvblend": {"gate_bound": 0.05, "gate_raise": 0.02}}, prompt_len=10)
    asked = connector.blend_config(params.policy, params.ratio, params.gate_bound, params.gate_raise)
    assert (asked.gate_bound, asked.gate_raise) == (0.05, 0.02)
    off = parse_params({"kvblend": {"gate_bound": "off", "gate_raise": "off"}}, prompt_len=10)
    assert not connector.blend_config(off.policy, off.ratio, off.gate_bound, off.gate_raise).gated
    assert parse_params({}, prompt_len=10).gate_bound is None  # not given: the connector's
    for name in ("gate_bound", "gate_raise"):
        for bad in (0, -0.1, "high", True, float("nan")):
            with pytest.raises(ValueError, match=f'{name} must be a number > 0 .*"off"'):
                parse_params({"kvblend": {name: bad}}, prompt_len=10)


def test_signals_and_decision():
    """The calibration's signals of a request whose question attends to the tokens the selection leaves reused, and
    whose chunk KV moved far, are high, those of one attending to the kept tokens of barely moved KV low; between
    them the raise bound doubles the first's ratio. The fallback's signal is the worst chunk's mean deviation; above
    the bound the request is a full prefill, and the raise is not asked."""
    scores = torch.tensor([5.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    picked, extended = torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3])
    on_kept = torch.tensor([0.3, 0.3, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    on_reused = torch.tensor([0.01, 0.01, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    low = gate_signals(on_kept, torch.full((8,), 0.001), scores, picked, extended)
    high = gate_signals(on_reused, torch.full((8,), 0.1), scores, picked, extended)
    assert low["reused_attention"] == pytest.approx(0.06) and high["reused_attention"] == pytest.approx(0.6)
    assert high["reused_deviation_attention"] == pytest.approx(0.06) and low["chunk_attention"] == pytest.approx(0.66)
    assert low["unselected_mass"] == pytest.approx(6 / 15) and high[RAISE_SIGNAL] == pytest.approx(0.1)
    assert low["marginal_mass"] == pytest.approx(2 / 15) and high["marginal_attention"] == pytest.approx(0.2)
    bound = (low[RAISE_SIGNAL] + high[RAISE_SIGNAL]) / 2
    passed, raised = GateReport(None, bound, signals=dict(low)), GateReport(None, bound, signals=dict(high))
    assert decide(passed, 0.15) == 0.15 and passed.decision == "pass" and RAISE_SIGNAL in passed.reason
    assert decide(raised, 0.15) == 0.3 and raised.decision == "raised" and "raised in place to 0.3" in raised.reason
    assert decide(GateReport(None, bound, signals=dict(high)), 0.6) == 1.0
    assert raised.as_dict()["ratio"] == 0.3 and raised.as_dict()["signals"][RAISE_SIGNAL] == pytest.approx(0.1)
    one_wrong = torch.cat([torch.full((30,), 1e-9), torch.full((10,), 0.5), torch.full((30,), 1e-9)])
    assert kv_mismatch(one_wrong, [30, 10, 30]) == pytest.approx(0.5) and kv_mismatch(one_wrong, [70]) < 0.1
    right, wrong = GateReport(DEFAULT_GATE_BOUND, ratio=0.15), GateReport(DEFAULT_GATE_BOUND, bound, ratio=0.15)
    assert not fall_back(right, 1e-9) and right.decision == "pass" and FALLBACK_SIGNAL in right.reason
    assert fall_back(wrong, 0.5) and wrong.decision == "full_prefill" and wrong.ratio == 1.0
    assert "full prefill" in wrong.reason and wrong.as_dict()["signals"] == {FALLBACK_SIGNAL: 0.5}
    assert not fall_back(GateReport(None, bound), 0.5)  # the raise alone: no fallback


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


def test_gate_in_place_ordinary_passes_broken_falls_back_raise_doubles():
    """The chunks' own KV: at layer 0 it matches the fresh KV up to rounding, the default gate passes and the blend
    is exactly the ungated one (logits, K/V, token-layers). Another text's KV under one chunk's key: the gate
    falls back in place, exactly the full_prefill policy's logits and K/V at its compute, nothing reused. The
    opt-in raise bound below the request's mean deviation: exactly the blend at twice the ratio."""
    model, engine, layout = stored_blend_case(5)
    off = engine.blend(layout, BlendConfig(gate_bound=None))
    watch = engine.blend(layout, BlendConfig(gate_bound=float("inf"), gate_calibration=True))
    assert off.stats.gate is None and torch.equal(off.logits, watch.logits)
    signals = watch.stats.gate["signals"]
    assert watch.stats.gate["decision"] == "pass" and signals[FALLBACK_SIGNAL] < 1e-6 < signals[RAISE_SIGNAL]
    assert "reuse_error" in signals and "reused_attention" in signals
    passed = engine.blend(layout, BlendConfig())
    assert passed.stats.gate["decision"] == "pass" and list(passed.stats.gate["signals"]) == [FALLBACK_SIGNAL]
    assert torch.equal(passed.logits, off.logits) and torch.equal(passed.k, off.k) and torch.equal(passed.v, off.v)
    assert passed.stats.token_layers_computed == off.stats.token_layers_computed
    raised = engine.blend(layout, BlendConfig(gate_raise=signals[RAISE_SIGNAL] * 0.99))
    doubled = engine.blend(layout, BlendConfig(ratio=0.3, gate_bound=None))
    assert raised.stats.gate["decision"] == "raised" and raised.stats.gate["ratio"] == 0.3
    assert torch.equal(raised.logits, doubled.logits) and raised.stats.tokens_reused == doubled.stats.tokens_reused
    assert raised.stats.token_layers_computed == doubled.stats.token_layers_computed
    full = engine.blend(layout, BlendConfig("full_prefill", 1.0))
    key = layout.chunks[1].key
    other = torch.randint(0, 512, (key.num_tokens,), generator=torch.Generator().manual_seed(70)).tolist()
    wrong = compute_chunk_kv(model, key, other)
    engine.store.put(key, ChunkKV(key, wrong.k, wrong.v, torch.tensor(layout.chunks[1].token_ids), 0))
    fell = engine.blend(layout, BlendConfig())
    gate = fell.stats.gate
    assert gate["decision"] == "full_prefill" and gate["ratio"] == 1.0 and gate["signals"][FALLBACK_SIGNAL] > 0.1
    assert "full prefill" in gate["reason"] and fell.stats.tokens_reused == 0
    assert torch.equal(fell.logits, full.logits) and torch.equal(fell.k, full.k) and torch.equal(fell.v, full.v)
    assert fell.stats.token_layers_computed == full.stats.token_layers_computed


@pytest.mark.slow
def test_default_gate_passes_ordinary_reuse_and_falls_back_on_broken_reuse(model_fp32, tokenizer):
    """SmolLM2 on a pydoc-topic case at the default bound: the chunks' own KV passes, computing what the ungated
    blend computes; the same chunks' KV left at the positions it was computed at (the rope shift skipped) falls
    back to a full prefill whose logits equal the full_prefill policy's."""
    from kvblend.blend.engine import BlendEngine
    from kvblend.blend.layout import ChunkRef
    from kvblend.blend.prompt import chat_template
    from kvblend.eval.fidelity import make_cases
    from kvblend.retrieval.corpus import pydoc_topics
    from kvblend.store.memory import MemoryTier
    from kvblend.store.tiered import TieredStore

    template = chat_template(tokenizer)
    case = make_cases(tokenizer, pydoc_topics(), [], 1, 256, (3, 3), seed=14)[0]
    store = TieredStore([MemoryTier(1 << 30)])
    engine = BlendEngine(model_fp32, store)
    refs, position = {}, len(template.prefix)
    for kind in ("own", "unshifted"):
        refs[kind] = []
        for ids in case.chunks:
            key = chunk_key(model_fp32, ids, kind)
            kv = compute_chunk_kv(model_fp32, key, ids)
            store.put(key, kv if kind == "own" else ChunkKV(key, kv.k, kv.v, kv.token_ids, position))
            refs[kind].append(ChunkRef(ids, key))
            position += len(ids) if kind == "unshifted" else 0
        position = len(template.prefix)
    ordinary = template.layout(tokenizer, refs["own"], case.question)
    gated, off = engine.blend(ordinary, BlendConfig()), engine.blend(ordinary, BlendConfig(gate_bound=None))
    assert gated.stats.gate["decision"] == "pass" and gated.stats.gate["signals"][FALLBACK_SIGNAL] < DEFAULT_GATE_BOUND / 10
    assert torch.equal(gated.logits, off.logits) and gated.stats.token_layers_computed == off.stats.token_layers_computed
    broken = engine.blend(template.layout(tokenizer, refs["unshifted"], case.question), BlendConfig())
    full = engine.blend(ordinary, BlendConfig("full_prefill", 1.0))
    assert broken.stats.gate["decision"] == "full_prefill", broken.stats.gate
    assert torch.equal(broken.logits, full.logits) and broken.stats.tokens_reused == 0


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
