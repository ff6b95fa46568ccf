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


@pytest.mark.parametrize("config", [BlendConfig("cacheblend", 0.15), BlendConfig("cacheblend", 0.2, head_tokens=4),
                                    BlendConfig.published(), BlendConfig("full_reuse", 0.0),
                                    BlendConfig("epic", 0.1, epic_tokens=8)])
def test_graph_replay_matches_eager(config):
    """The eager engine reads chunk KV already on the GPU; the graphed one from pinned memory (staged in groups
    of layers): post-check graphs capture on the first order, check-layer graphs on the second (a repeated
    shape), the third replays both."""
    model = random_llama("cuda", "bfloat16")
    gen = torch.Generator().manual_seed(1)
    chunks = []
    for _ in range(5):
        ids = torch.randint(0, 512, (200,), generator=gen)
        out = model.prefill(ids.cuda())
        key = ChunkKey.for_tokens(model.spec.fingerprint, ids.tolist(), "test")
        chunks.append((ChunkRef(tuple(ids.tolist()), key), out.k, out.v))
    question = torch.randint(0, 512, (37,), generator=gen).tolist()
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
