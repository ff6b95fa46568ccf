"""The question pass (BlendConfig.weighting, ProphetKV-style): the question's attention over the reused chunk KV
through every layer weights the selection. On a small random Llama on CPU: no model download, fast."""

import pytest
import torch
from tiny_models import stored_blend_case

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.select import select_count
from kvblend.blend.source import TensorLayerSource
from kvblend.rag.precompute import compute_chunk_kv


@pytest.fixture(scope="module")
def setup():
    return stored_blend_case(3)


def test_weighting_is_validated():
    assert BlendConfig().weighting == "check"
    with pytest.raises(ValueError, match="weighting"):
        BlendConfig(weighting="prophet")


def test_question_pass_picks_the_rows_the_question_attends_most(setup):
    _, engine, layout = setup
    config = BlendConfig(ratio=0.2, check_layers=(0,), deviation="none", weighting="question_pass")
    plan = engine.plan(layout, config)
    run = engine.start(plan)
    cached = plan.cached_rows
    ahead = run.question_attention[cached]
    assert ahead.min() >= 0 and ahead.mean().item() == pytest.approx(1.0, rel=1e-5)  # each layer's mean is 1
    assert ahead.std() > 0.01  # not uniform, so the top rows are a real choice
    with torch.inference_mode():
        run.step(0)
    count = select_count(0.2, cached.numel())
    expected = cached[torch.topk(ahead, count).indices].sort().values
    assert torch.equal(run.rows[torch.isin(run.rows, cached)], expected)


def test_question_pass_counts_its_compute_and_is_exact_at_ratio_one(setup):
    model, engine, layout = setup
    layers = model.spec.num_layers
    full = engine.blend(layout, BlendConfig("full_prefill", 1.0), logits_at="suffix")
    plain = engine.blend(layout, BlendConfig(ratio=1.0), logits_at="suffix")
    ahead = engine.blend(layout, BlendConfig(ratio=1.0, weighting="question_pass"), logits_at="suffix")
    torch.testing.assert_close(ahead.logits, full.logits, rtol=1e-4, atol=1e-4)
    fixed = layout.num_tokens - sum(len(c.token_ids) for c in layout.chunks)
    assert ahead.stats.token_layers_computed == plain.stats.token_layers_computed + fixed * layers
    partial = engine.blend(layout, BlendConfig(ratio=0.15, weighting="both"), logits_at="suffix")
    assert 0 < partial.stats.compute_fraction < 1


def test_question_pass_needs_the_store(setup):
    model, _, layout = setup
    engine = BlendEngine(model)  # chunk KV from a caller's source, no store: the pass has nothing to read twice
    keys = [c.key for c in layout.chunks]
    kv = [compute_chunk_kv(model, k, c.token_ids) for k, c in zip(keys, layout.chunks)]
    source = TensorLayerSource([e.k for e in kv], [e.v for e in kv], "cpu")
    plan = engine.plan(layout, BlendConfig(weighting="question_pass"), bases={k: 0 for k in keys})
    with pytest.raises(ValueError, match="question pass"):
        engine.run(plan, source=source)
