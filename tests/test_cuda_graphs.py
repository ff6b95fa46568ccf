"""CUDA-graph replay of the post-check layers: the same K/V and logits as the eager engine (needs a GPU)."""

import pytest
import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.blend.source import TensorLayerSource
from kvblend.model.runner import LlamaModel
from kvblend.model.spec import spec_from_config
from kvblend.model.weights import weights_from_tensors
from kvblend.store.key import ChunkKey

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=8192,
              rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"])


def random_model() -> LlamaModel:
    spec = spec_from_config(CONFIG, dtype="bfloat16", weights_id="random-test")
    gen = torch.Generator().manual_seed(0)
    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    shapes = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
              "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
              "mlp.down_proj.weight": (h, i)}
    tensors = {f"model.layers.{n}.{name}": torch.randn(shape, generator=gen) * (1.0 if len(shape) == 1 else 0.05)
               for n in range(spec.num_layers) for name, shape in shapes.items()}
    tensors["model.embed_tokens.weight"] = torch.randn(spec.vocab_size, h, generator=gen)
    tensors["model.norm.weight"] = torch.ones(h)
    tensors["lm_head.weight"] = torch.randn(spec.vocab_size, h, generator=gen) * 0.05
    return LlamaModel(spec, weights_from_tensors(tensors, spec, "cuda"))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("config", [BlendConfig("cacheblend", 0.15, gate_bound=None), BlendConfig("full_reuse", 0.0),
                                    BlendConfig("epic", 0.1, epic_tokens=8)])
def test_graph_replay_matches_eager(config):
    model = random_model()
    gen = torch.Generator().manual_seed(1)
    chunks = []
    for _ in range(5):
        ids = torch.randint(0, 512, (200,), generator=gen)
        out = model.prefill(ids.cuda())
        key = ChunkKey.for_tokens(model.spec.fingerprint, ids.tolist(), "test")
        chunks.append((ChunkRef(tuple(ids.tolist()), key), out.k.cpu().pin_memory(), out.v.cpu().pin_memory()))
    question = torch.randint(0, 512, (37,), generator=gen).tolist()
    eager, graphed = BlendEngine(model), BlendEngine(model, cuda_graphs=True)
    for order in ([0, 1, 2, 3], [3, 1, 4, 2], [2, 0, 1, 4]):  # capture on the first, replay on the others
        layout = PromptLayout.build([], [chunks[i][0] for i in order], question)
        results = []
        for engine in (eager, graphed):
            source = TensorLayerSource([chunks[i][1] for i in order], [chunks[i][2] for i in order], "cuda")
            plan = engine.plan(layout, config, logits_at="suffix", bases={c.key: 0 for c in layout.chunks})
            results.append(engine.run(plan, source=source))
        ref, out = results  # padded rows change the GEMMs' shapes, hence bf16 rounding: close, not equal
        for a, b in ((out.k, ref.k), (out.v, ref.v), (out.logits, ref.logits)):
            assert not a.isnan().any() and relative_error(a, b) < 1e-2
        assert out.stats.token_layers_computed == ref.stats.token_layers_computed
    stats = graphed.graphs.stats()
    assert len(stats) == 1 and stats[0]["capture_ms"] > 0
