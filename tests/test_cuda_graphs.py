"""CUDA-graph replay of the post-check layers: the same K/V and logits as the eager engine (needs a GPU)."""

import pytest
import torch
from tiny_models import random_llama

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.blend.source import TensorLayerSource
from kvblend.store.key import ChunkKey

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def prefilled_chunks(model, n: int = 5) -> list[tuple[ChunkRef, torch.Tensor, torch.Tensor]]:
    """n random 200-token chunks with their KV, each prefilled alone on the GPU."""
    gen = torch.Generator().manual_seed(1)
    chunks = []
    for _ in range(n):
        ids = torch.randint(0, 512, (200,), generator=gen)
        out = model.prefill(ids.cuda())
        key = ChunkKey.for_tokens(model.spec.fingerprint, ids.tolist(), "test")
        chunks.append((ChunkRef(tuple(ids.tolist()), key), out.k, out.v))
    return chunks


@pytest.mark.parametrize("config", [BlendConfig("cacheblend", 0.15), BlendConfig("cacheblend", 0.2, head_tokens=4),
                                    BlendConfig.published(), BlendConfig("full_reuse", 0.0),
                                    BlendConfig("epic", 0.1, epic_tokens=8)])
def test_graph_replay_matches_eager(config):
    """The eager engine reads chunk KV already on the GPU; the graphed one from pinned memory (staged in groups
    of layers): post-check graphs capture on the first order, check-layer graphs on the second (a repeated
    shape), the third replays both."""
    model = random_llama("cuda", "bfloat16")
    chunks = prefilled_chunks(model)
    question = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    eager, graphed = BlendEngine(model), BlendEngine(model, cuda_graphs=True)
    for order in ([0, 1, 2, 3], [3, 1, 4, 2], [2, 0, 1, 4]):
        layout = PromptLayout.build([], [chunks[i][0] for i in order], question)
        results = []
        for engine, pinned in ((eager, False), (graphed, True)):
            ks, vs = ([chunks[i][n].cpu().pin_memory() if pinned else chunks[i][n] for i in order] for n in (1, 2))
            source = TensorLayerSource(ks, vs, "cuda", group=4)
            plan = engine.plan(layout, config, logits_at="suffix", bases={c.key: 0 for c in layout.chunks})
            results.append(engine.run(plan, source=source))
        ref, out = results  # padded rows change the GEMMs' shapes, hence bf16 rounding: close, not equal
        for a, b in ((out.k, ref.k), (out.v, ref.v), (out.logits, ref.logits)):
            assert not a.isnan().any() and relative_error(a, b) < 1e-2
        assert out.stats.token_layers_computed == ref.stats.token_layers_computed
        assert out.stats.tokens_recomputed == ref.stats.tokens_recomputed
    stats = graphed.graphs.stats()
    assert len(stats) == 1 and stats[0]["capture_ms"] > 0
    check = graphed.check_graphs.stats()  # the quality gate reads its signal on the host: its check layers stay eager
    captured = config.selects and not (config.policy == "cacheblend" and config.gated)
    assert len(check) == (1 if captured else 0) and all(e["capture_ms"] > 0 for e in check)


def test_profiled_run_times_each_stage_once():
    """A profiled run (its stages' ends timed by CUDA events, no syncs) gives the unprofiled run's logits; its stages,
    each counted once (a post-check layer's fill is not in its graph's time), add up to no more than the run's
    device time; its source says what the chunk KV's copies moved, from pinned memory, at what rate."""
    model = random_llama("cuda", "bfloat16")
    chunks = prefilled_chunks(model)
    layout = PromptLayout.build([], [c for c, _, _ in chunks], list(range(40)))
    engine = BlendEngine(model, cuda_graphs=True)
    results, spans, copies = [], [], []
    for profile in (False, False, True):  # the second run replays the post-check graphs, as the profiled one does
        source = TensorLayerSource([k.cpu().pin_memory() for _, k, _ in chunks],
                                   [v.cpu().pin_memory() for _, _, v in chunks], "cuda", timed=profile)
        plan = engine.plan(layout, BlendConfig("cacheblend", 0.15), bases={c.key: 0 for c in layout.chunks})
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        results.append(engine.run(plan, source=source, profile=profile))
        end.record()
        end.synchronize()
        spans.append(start.elapsed_time(end))
        copies.append(source.copy_times())
    replayed, profiled = results[1], results[2]
    assert relative_error(profiled.logits, replayed.logits) < 1e-2 and profiled.stats.graphs == "replayed"
    stages = profiled.stats.stage_ms
    assert {"fetch_wait", "rope_shift_gather", "post_check_graphs"} <= set(stages), stages
    assert 0 < sum(stages.values()) <= spans[2], (stages, spans[2])
    assert copies[1] == {} and copies[2]["pinned"] and copies[2]["GBps"] > 0, copies
    assert copies[2]["bytes"] == sum(k.nbytes + v.nbytes for _, k, v in chunks), copies[2]


def test_reports_say_why_graphs_serve_no_run():
    """A run the graphs cannot serve says why in its report: every row recomputed, or no layer after the last
    check layer."""
    model = random_llama("cuda", "bfloat16")
    ids = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(2))
    out = model.prefill(ids.cuda())
    chunk = ChunkRef(tuple(ids.tolist()), ChunkKey.for_tokens(model.spec.fingerprint, ids.tolist(), "test"))
    layout = PromptLayout.build([], [chunk], [1, 2, 3])
    engine = BlendEngine(model, cuda_graphs=True)
    last = model.spec.num_layers - 1
    for config, why in ((BlendConfig("full_prefill"), "not used: every row is recomputed"),
                        (BlendConfig("cacheblend", 0.5, check_layers=(1, last), gate_bound=None),
                         "not used: the last check layer is the model's last")):
        plan = engine.plan(layout, config, logits_at="suffix", bases={chunk.key: 0})
        source = TensorLayerSource([out.k], [out.v], "cuda") if plan.cached_keys else None
        assert engine.run(plan, source=source).stats.graphs == why
