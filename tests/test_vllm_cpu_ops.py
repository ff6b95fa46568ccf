"""vLLM's C++ rotary kernel as the blend's rope shift: against its torch reference on random data, the start-up
check catching a wrong op, and a blend agreeing with the torch ops."""

import dataclasses

import pytest
import torch

pytest.importorskip("vllm")

from kvblend.blend.config import BlendConfig  # noqa: E402
from kvblend.blend.engine import BlendEngine  # noqa: E402
from kvblend.blend.layout import ChunkRef, PromptLayout  # noqa: E402
from kvblend.model.ops import DEFAULT_OPS  # noqa: E402
from kvblend.model.runner import LlamaModel  # noqa: E402
from kvblend.rag.precompute import chunk_key, compute_chunk_kv  # noqa: E402
from kvblend.store.memory import MemoryTier  # noqa: E402
from kvblend.store.tiered import TieredStore  # noqa: E402
from kvblend.vllm.cpu_ops import VLLM_CPU_OPS, check_ops  # noqa: E402
from kvblend.vllm.cpu_ops import rope_shift_gather as vllm_rope_shift_gather  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOLERANCE)


def inv_freq(rotary_dim: int) -> torch.Tensor:
    return 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rope_shift_gather_matches_reference(dtype, style, rotary_dim):
    gen = torch.Generator().manual_seed(3)
    src_k, src_v = torch.randn(50, 3, 64, generator=gen).to(dtype), torch.randn(50, 3, 64, generator=gen).to(dtype)
    src_rows, dst_rows = torch.randperm(50, generator=gen)[:37], torch.randperm(70, generator=gen)[:37]
    delta = torch.randint(-3000, 3000, (37,), generator=gen)
    outs = []
    for ops, kw in ((VLLM_CPU_OPS, {}), (DEFAULT_OPS, {"backend": "torch"})):
        dst_k, dst_v = (torch.full((70, 3, 64), float("nan"), dtype=dtype) for _ in "kv")
        ops.rope_shift_gather(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, inv_freq(rotary_dim), style, **kw)
        outs.append((dst_k, dst_v))
    (got_k, got_v), (want_k, want_v) = outs
    written = torch.zeros(70, dtype=torch.bool)
    written[dst_rows] = True
    assert got_k[~written].isnan().all() and not got_k[written].isnan().any()
    close(got_k[written], want_k[written], dtype)
    assert torch.equal(got_v[written], want_v[written])


def test_rope_shift_gather_rejects_bad_rows():
    k = torch.randn(10, 3, 64)
    with pytest.raises(ValueError, match="src_rows"):
        VLLM_CPU_OPS.rope_shift_gather(k, k, torch.tensor([10]), torch.empty(4, 3, 64), torch.empty(4, 3, 64),
                                       torch.tensor([0]), torch.tensor([5]), inv_freq(64), "neox")


def test_check_accepts_vllm_ops_and_catches_a_wrong_one():
    for dtype in (torch.bfloat16, torch.float32):
        for style in ("neox", "gptj"):
            assert check_ops(VLLM_CPU_OPS, dtype, 64, style) is None
    swapped = dataclasses.replace(VLLM_CPU_OPS, name="swapped", rope_shift_gather=lambda *args, **kw: (
        vllm_rope_shift_gather(*args[:-1], "gptj", **kw)))
    reason = check_ops(swapped, torch.bfloat16, 64, "neox")
    assert reason is not None and "swapped rope_shift_gather" in reason


@pytest.fixture(scope="module")
def models(model_dir):
    return (LlamaModel.from_dir(model_dir, dtype="bfloat16"),
            LlamaModel.from_dir(model_dir, dtype="bfloat16", ops=VLLM_CPU_OPS))


def last_token_kl(a: torch.Tensor, b: torch.Tensor) -> float:
    p, q = (torch.log_softmax(x.float().reshape(-1, x.shape[-1])[-1], -1) for x in (a, b))
    return torch.sum(p.exp() * (p - q)).item()


@pytest.mark.slow
def test_blend_on_vllm_ops_matches_torch_ops(models):
    torch_model = models[0]
    gen = torch.Generator().manual_seed(5)
    chunks = [torch.randint(0, 49152, (96,), generator=gen).tolist() for _ in range(3)]
    store = TieredStore([MemoryTier(1 << 30)])
    refs = []
    for ids in chunks:
        key = chunk_key(torch_model, ids)
        store.put(key, compute_chunk_kv(torch_model, key, ids))
        refs.append(ChunkRef(tuple(ids), key))
    layout = PromptLayout.build([1, 2, 3], refs[::-1], torch.randint(0, 49152, (24,), generator=gen).tolist())
    config = BlendConfig("cacheblend", 0.15, gate_bound=None)  # a gate raise on one side only would not compare
    torch_ops, vllm_ops = (BlendEngine(m, store).blend(layout, config) for m in models)
    assert vllm_ops.stats.tokens_reused > 0 and vllm_ops.stats.tokens_recomputed > 0
    assert abs(vllm_ops.stats.tokens_recomputed - torch_ops.stats.tokens_recomputed) <= 3
    kl = last_token_kl(torch_ops.logits, vllm_ops.logits)
    assert kl < 0.02, f"KL(blend on torch ops || blend on vLLM ops) = {kl}"
