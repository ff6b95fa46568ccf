"""The CacheBlend engine on the real SmolLM2 weights (fp32): policies, exactness at the ends, bad layouts."""

import logging

import pytest
import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine, aligned_to_device
from kvblend.blend.layout import ChunkRef, LayoutError, PromptLayout
from kvblend.blend.prompt import chat_template
from kvblend.blend.select import deviation_scores, select_count, select_tokens
from kvblend.eval.fidelity import kl_per_token
from kvblend.model.tokenizer import encode
from kvblend.rag.precompute import chunk_key, compute_chunk_kv, token_windows
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.rope import rope_shift
from kvblend.store import DiskTier, MemoryTier, TieredStore
from kvblend.store.key import ChunkKey

pytestmark = pytest.mark.slow  # every test runs the SmolLM2 model

CHUNK = 64


@pytest.fixture(scope="module")
def template(tokenizer):
    return chat_template(tokenizer)


@pytest.fixture(scope="module")
def chunk_pool(tokenizer):
    """Twelve full 64-token windows from four pydoc topics."""
    pool = []
    for doc in pydoc_topics(["exceptions", "import", "execmodel", "compound"]):
        pool.extend(w for w in token_windows(encode(tokenizer, doc.text), CHUNK)[1:4] if len(w) == CHUNK)
    return pool


@pytest.fixture(scope="module")
def store(model_fp32, chunk_pool):
    store = TieredStore([MemoryTier(1 << 30)])
    for ids in chunk_pool:
        key = chunk_key(model_fp32, ids)
        store.put(key, compute_chunk_kv(model_fp32, key, ids))
    return store


def make_layout(model, template, tokenizer, pool, picks, question="What happens when an exception is raised?"):
    refs = [ChunkRef(tuple(pool[i]), chunk_key(model, pool[i])) for i in picks]
    return template.layout(tokenizer, refs, question)


def test_full_prefill_equals_plain_prefill(model_fp32, template, tokenizer, chunk_pool, store):
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [4, 0, 7])
    engine = BlendEngine(model_fp32, store)
    blended = engine.blend(layout, BlendConfig("full_prefill", 1.0), logits_at="suffix")
    suffix = torch.arange(layout.suffix_start, layout.num_tokens)
    plain = model_fp32.prefill(layout.token_ids(), logits_at=suffix)
    rel = (blended.logits - plain.logits).norm() / plain.logits.norm()
    assert rel < 1e-3
    assert torch.equal(blended.logits.argmax(-1), plain.logits.argmax(-1))
    assert model_fp32.greedy(blended.k, blended.v, blended.logits[-1], 12) == model_fp32.greedy(
        plain.k, plain.v, plain.logits[-1], 12)
    assert blended.stats.tokens_reused == 0 and blended.stats.compute_fraction == 1.0


def test_cacheblend_full_ratio_reproduces_full_prefill(model_fp32, template, tokenizer, chunk_pool, store):
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [1, 5])
    engine = BlendEngine(model_fp32, store)
    full = engine.blend(layout, BlendConfig("full_prefill", 1.0), logits_at="suffix")
    r1 = engine.blend(layout, BlendConfig("cacheblend", 1.0), logits_at="suffix")
    assert kl_per_token(full.logits, r1.logits).max() < 1e-6
    assert r1.stats.recompute_ratio == 1.0


def test_recompute_beats_full_reuse(model_fp32, template, tokenizer, chunk_pool, store):
    engine = BlendEngine(model_fp32, store)
    kl = {"full_reuse": [], "cacheblend": []}
    for picks in ([4, 0, 7], [8, 2, 5, 1]):
        layout = make_layout(model_fp32, template, tokenizer, chunk_pool, picks)
        full = engine.blend(layout, BlendConfig("full_prefill", 1.0), logits_at="suffix")
        for policy, ratio in (("full_reuse", 0.0), ("cacheblend", 0.15)):
            out = engine.blend(layout, BlendConfig(policy, ratio), logits_at="suffix")
            kl[policy].append(kl_per_token(full.logits, out.logits).mean().item())
    assert sum(kl["cacheblend"]) < sum(kl["full_reuse"])
    assert sum(kl["full_reuse"]) > 1e-3


def test_cacheblend_selects_top_deviation_tokens(model_fp32, template, tokenizer, chunk_pool, store):
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [3, 6, 0])
    engine = BlendEngine(model_fp32, store)
    config = BlendConfig("cacheblend", 0.2, check_layers=(1,), attention_weighted=False, gate_bound=None)
    plan = engine.plan(layout, config)
    run = engine.start(plan)
    with torch.inference_mode():
        run.step(0)
        rows = run.rows
        _, k, v = model_fp32.qkv(1, run.h, plan.positions[rows])
        cached = plan.cached_rows
        in_chunk = torch.isin(rows, cached)
        reused_k = torch.cat([store.get(c.key).k[1] for c in layout.chunks])
        reused_v = torch.cat([store.get(c.key).v[1] for c in layout.chunks])
        reused_k = rope_shift(reused_k, plan.cached_delta, model_fp32.spec.rope)
        scores = deviation_scores(k[in_chunk], v[in_chunk], reused_k, reused_v, "kv")
        expected = cached[select_tokens(scores, select_count(0.2, cached.numel()))]
        run.step(1)
    kept_chunk_rows = run.rows[torch.isin(run.rows, cached)]
    assert torch.equal(kept_chunk_rows, expected)
    assert kept_chunk_rows.numel() == select_count(0.2, cached.numel())
    suffix = torch.arange(layout.suffix_start, layout.num_tokens)
    assert torch.isin(suffix, run.rows).all()


def test_epic_recomputes_chunk_heads(model_fp32, template, tokenizer, chunk_pool, store):
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [2, 9])
    engine = BlendEngine(model_fp32, store)
    plan = engine.plan(layout, BlendConfig("epic", 0.1, epic_tokens=5))
    starts = layout.chunk_starts()
    heads = torch.cat([torch.arange(s, s + 5) for s in starts])
    chunk_rows = plan.cached_rows
    assert torch.equal(plan.initial_rows[torch.isin(plan.initial_rows, chunk_rows)], heads)
    result = engine.run(plan)
    assert result.stats.tokens_recomputed == 10 and result.stats.tokens_reused == 2 * CHUNK - 10


def test_full_reuse_recomputes_no_chunk_token(model_fp32, template, tokenizer, chunk_pool, store):
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [2, 9])
    engine = BlendEngine(model_fp32, store)
    result = engine.blend(layout, BlendConfig("full_reuse", 0.0))
    assert result.stats.tokens_recomputed == 0 and result.stats.tokens_reused == 2 * CHUNK
    cached = store.get(layout.chunks[1].key)
    start = layout.chunk_starts()[1]
    torch.testing.assert_close(result.v[:, start : start + CHUNK], cached.v)


def test_bad_layouts_raise_clear_errors(model_fp32, template, tokenizer, chunk_pool, store):
    with pytest.raises(LayoutError, match="empty chunk"):
        ChunkRef((), chunk_key(model_fp32, [1]))
    with pytest.raises(LayoutError, match="other token ids"):
        ChunkRef((1, 2, 3), chunk_key(model_fp32, [1, 2, 4]))
    with pytest.raises(LayoutError, match="empty question"):
        template.layout(tokenizer, [], "  ")
    engine = BlendEngine(model_fp32, store)
    unknown = ChunkRef((5, 6, 7), chunk_key(model_fp32, [5, 6, 7]))
    layout = PromptLayout.build(template.prefix, [unknown], [10, 11])
    with pytest.raises(LayoutError, match="not in the store"):
        engine.plan(layout, BlendConfig())
    ids = tuple(range(100, 100 + 4000))
    long_chunk = ChunkRef(ids, chunk_key(model_fp32, ids))
    too_long = PromptLayout.build(template.prefix, [long_chunk, long_chunk, long_chunk], [10])
    with pytest.raises(LayoutError, match="exceeds the model's max length"):
        engine.plan(too_long, BlendConfig())
    with pytest.raises(ValueError, match="unknown blend policy"):
        BlendConfig("magic")


def test_missing_chunk_recomputed_when_asked(model_fp32, template, tokenizer, chunk_pool, store, caplog):
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [0, 1])
    ids = tuple(chunk_pool[10])
    absent = ChunkRef(ids, ChunkKey.for_tokens(model_fp32.spec.fingerprint, ids, namespace="absent"))
    layout = PromptLayout.build(layout.prefix, [layout.chunks[0], absent], layout.suffix)
    engine = BlendEngine(model_fp32, store)
    with caplog.at_level(logging.WARNING):
        result = engine.blend(layout, BlendConfig("full_reuse", 0.0), on_missing="recompute")
    assert "not in the store" in caplog.text
    assert result.stats.tokens_recomputed == len(ids)


@pytest.mark.parametrize("prefetch", [True, False])
def test_fetching_ahead_or_in_line_gives_the_same_blend(model_fp32, template, tokenizer, chunk_pool, store, prefetch):
    from kvblend.blend.source import StoreLayerSource, kv_layout

    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [2, 8, 5])
    engine = BlendEngine(model_fp32, store)
    plan = engine.plan(layout, BlendConfig("cacheblend", 0.15, gate_bound=None))  # a fixed ratio
    default = engine.run(plan)
    source = StoreLayerSource(store, plan.cached_keys, "cpu", kv_layout(model_fp32.spec), prefetch=prefetch)
    chosen = engine.run(plan, source=source)
    assert source.prefetch is prefetch
    assert torch.equal(chosen.k, default.k) and torch.equal(chosen.logits, default.logits)


@pytest.mark.parametrize("prefetch", [True, False])
def test_corrupt_entry_mid_run_falls_back_to_recompute(model_fp32, template, tokenizer, chunk_pool, tmp_path, caplog,
                                                       monkeypatch, prefetch):
    from kvblend.blend import source

    monkeypatch.setattr(source, "background_fetch_pays", lambda device: prefetch)
    disk = DiskTier(tmp_path, 1 << 30)
    store = TieredStore([disk])
    picks = [chunk_pool[0], chunk_pool[4]]
    refs = []
    for ids in picks:
        key = chunk_key(model_fp32, ids)
        store.put(key, compute_chunk_kv(model_fp32, key, ids))
        refs.append(ChunkRef(tuple(ids), key))
    store.flush()
    template = chat_template(tokenizer)
    layout = template.layout(tokenizer, refs, "What is a lambda?")
    path = disk.path(refs[1].key)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF  # corrupt the last layer's V: plan's layer-0 read still passes
    path.write_bytes(bytes(blob))
    engine = BlendEngine(model_fp32, store)
    with caplog.at_level(logging.WARNING):
        result = engine.blend(layout, BlendConfig("cacheblend", 0.15))
    assert "recomputing" in caplog.text
    assert 1 in result.plan.recomputed_chunks and not path.exists()
    full = model_fp32.prefill(layout.token_ids())
    assert torch.equal(result.logits.argmax(-1), full.logits.argmax(-1))


def test_rope_self_check_refuses_unshiftable_rope(model_fp32):
    from dataclasses import replace

    from kvblend.blend.rope_check import check_rope_shift

    assert check_rope_shift(model_fp32.spec) is None
    dynamic = replace(model_fp32.spec.rope, scaling_type="dynamic", scaling={"factor": 2.0})
    assert "cannot be shifted exactly" in check_rope_shift(replace(model_fp32.spec, rope=dynamic))


def test_failed_rope_self_check_disables_blending(model_fp32, template, tokenizer, chunk_pool, store, caplog, monkeypatch):
    import kvblend.blend.rope_check as rope_check

    monkeypatch.setattr(rope_check, "rope_shift", lambda k, delta, rope, freq=None: k)  # a broken shift
    with caplog.at_level(logging.WARNING):
        engine = BlendEngine(model_fp32, store)
    assert "differs from direct rotation" in engine.disabled_reason and "blending disabled" in caplog.text
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [0, 1])
    plan = engine.plan(layout, BlendConfig("cacheblend", 0.15))
    assert plan.cached_keys == [] and plan.initial_rows.numel() == layout.num_tokens


def test_segments_with_gaps_and_exact_prefix(model_fp32, template, tokenizer, chunk_pool, store):
    """Chunks found mid-prompt with plain tokens between them, and a prefix whose KV is already exact (as when
    vLLM's prefix cache covers the first rows, here reaching into the first chunk)."""
    a, b = (ChunkRef(tuple(chunk_pool[i]), chunk_key(model_fp32, chunk_pool[i])) for i in (6, 2))
    sep = tuple(encode(tokenizer, "\n\n---\n\n"))
    layout = PromptLayout.from_segments([template.prefix, a, sep, b, sep, encode(tokenizer, "Summarise.")])
    ids = layout.token_ids()
    suffix = torch.arange(layout.suffix_start, layout.num_tokens)
    plain = model_fp32.prefill(ids, logits_at=suffix)
    exact = len(template.prefix) + 10
    engine = BlendEngine(model_fp32, store)
    prefix_kv = (plain.k[:, :exact], plain.v[:, :exact])
    r1 = engine.run(engine.plan(layout, BlendConfig("cacheblend", 1.0), logits_at="suffix", exact_prefix=exact),
                    prefix_kv=prefix_kv)
    assert kl_per_token(plain.logits, r1.logits).max() < 1e-6
    torch.testing.assert_close(r1.k[:, :exact], plain.k[:, :exact], rtol=0, atol=0)
    reuse_plan = engine.plan(layout, BlendConfig("full_reuse", 0.0), logits_at="suffix", exact_prefix=exact)
    assert reuse_plan.cached_rows.min() == exact and reuse_plan.cached_rows.numel() == 2 * CHUNK - 10
    reuse = engine.run(reuse_plan, prefix_kv=prefix_kv)
    b_start = layout.chunk_starts()[1]
    torch.testing.assert_close(reuse.v[:, b_start : b_start + CHUNK], store.get(b.key).v)
    assert torch.isin(torch.arange(b_start + CHUNK, b_start + CHUNK + len(sep)), reuse_plan.fixed_rows).all()


def test_tensor_source_gives_the_same_blend_as_the_store(model_fp32, template, tokenizer, chunk_pool, store):
    from kvblend.blend.source import TensorLayerSource

    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [7, 3, 9])
    engine = BlendEngine(model_fp32, store)
    config = BlendConfig("cacheblend", 0.15, gate_bound=None)  # a fixed ratio
    from_store = engine.run(engine.plan(layout, config))
    entries = [store.get(c.key) for c in layout.chunks]
    source = TensorLayerSource([e.k for e in entries], [e.v for e in entries], "cpu")
    plan = engine.plan(layout, config, bases={c.key: 0 for c in layout.chunks})
    from_tensors = engine.run(plan, source=source)
    assert torch.equal(from_tensors.k, from_store.k) and torch.equal(from_tensors.logits, from_store.logits)


def test_gradual_filtering_shrinks_a_candidate_set(model_fp32, template, tokenizer, chunk_pool, store):
    """Default cacheblend: 30% of chunk tokens kept at layer 1, a 15% subset of them at layer 3."""
    assert BlendConfig().ratios() == (0.3, 0.15) and BlendConfig(ratio=0.6).ratios() == (1.0, 0.6)
    assert BlendConfig(check_layers=(1, 2, 3), ratio=0.1).ratios() == pytest.approx((0.2, 0.15, 0.1))
    layout = make_layout(model_fp32, template, tokenizer, chunk_pool, [5, 8, 2, 11])
    engine = BlendEngine(model_fp32, store)
    plan = engine.plan(layout, BlendConfig(gate_bound=None))  # a fixed ratio
    run = engine.start(plan)
    n = plan.cached_rows.numel()
    kept = []
    with torch.inference_mode():
        for layer in range(4):
            run.step(layer)
            kept.append(run.rows[torch.isin(run.rows, plan.cached_rows)])
    assert kept[0].numel() == n
    assert kept[1].numel() == select_count(0.3, n) and kept[2].numel() == select_count(0.3, n)
    assert kept[3].numel() == select_count(0.15, n) and torch.isin(kept[3], kept[1]).all()


def test_index_vectors_reach_the_device_on_16_byte_boundaries():
    """Every index vector a run reads starts 16-byte aligned whatever the lengths before it (Triton specializes on
    pointer alignment: an odd offset compiled a second kernel variant inside a CUDA-graph capture)."""
    parts = [torch.arange(n, dtype=torch.int64) * 7 - 3 for n in (5, 1, 0, 8, 3)]
    views = aligned_to_device(parts, torch.device("cpu"))
    for part, view in zip(parts, views):
        assert torch.equal(part, view) and view.data_ptr() % 16 == 0
