"""The blend inside vLLM on a GPU, in vLLM's default GPU mode (torch.compile and CUDA graphs on, not enforce_eager;
async scheduling off, which the connector requires): for tiny random Llama / Qwen2 / Qwen3 / Mistral checkpoints,
the checks the CPU tests run (vllm_helpers.check_blend_on_vllm_modules): the start-up self-check passes with
FLASH_ATTN (Hopper's default backend), the blend at r=1 reproduces vLLM's own KV and first-token logprobs, full
reuse matches the torch runner, and a storage-mode load lands before a whole-model CUDA graph replays. One engine
per architecture. With SmolLM2's weights in the model folder (benchmarks/device/smollm2.sh carries them), the
first-token KL gap CacheBlend closes, as tests/test_vllm_blend.py measures it on the CPU. Skipped without CUDA and
vLLM."""

import importlib.util

import pytest
import torch
from tiny_models import save_tiny_model
from vllm_helpers import (
    BLENDABLE,
    GPU_ENGINE_ARGS,
    LOGPROB_TOL,
    check_blend_on_vllm_modules,
    fidelity_chunks,
    generate,
    kl_gap_closed,
    max_logprob_gap,
    prompt_with,
    report,
    start_llm,
    stop_llm,
    text_chunks,
    top_logprobs,
)

from kvblend.blend.prompt import chat_template
from kvblend.model.tokenizer import encode

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                                 reason="needs a CUDA GPU and vLLM")]


@pytest.fixture(scope="module")
def chunks(tokenizer):
    return text_chunks(tokenizer)


@pytest.fixture(scope="module", params=BLENDABLE)
def engine(request, model_dir, tmp_path_factory):
    tiny = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param), model_dir)
    store_dir = tmp_path_factory.mktemp(f"{request.param}-store")
    # the loading controller off, as in the benchmark: its decisions (a raised ratio, a recompute) would change
    # what is checked
    llm = start_llm(tiny, {"mode": "blend", "store_dir": str(store_dir), "controller": False},
                    engine_args=GPU_ENGINE_ARGS)
    yield tiny, store_dir, llm
    stop_llm(llm)


def test_blend_in_vllm_default_gpu_mode(engine, chunks, tokenizer):
    tiny, store_dir, llm = engine
    check = check_blend_on_vllm_modules(llm, tiny, store_dir, chunks, tokenizer, backend="FLASH_ATTN")
    assert not check["layerwise_loads"]  # whole-model CUDA graphs on: loads land before the forward
    assert check["attention"] == "kvblend"  # a GPU's default: the sparse-query kernel, not one sequence per row run
    assert check["cuda_graphs"]  # vLLM's graphs are on: so are the blend's post-check graphs


def test_post_check_graphs_replay_what_ran_eagerly(engine, chunks, tokenizer):
    """A new prompt shape runs its post-check layers eagerly and captures them; the next request of that shape
    replays the graphs, writing the same KV into its own blocks (so vLLM's next token sees the same logprobs).
    Two tokens each: a request that ends at its first token is freed before the worker's part of its report
    arrives (kvblend.vllm.scheduler)."""
    _, _, llm = engine
    prompt, spans = prompt_with(chunks, tokenizer)
    prompt += encode(tokenizer, " Answer in one word, then explain it in two sentences of plain English.") * 3
    outs = [generate(llm, [prompt], kvblend={"chunks": spans, "policy": "full_reuse"}, salt=f"graphs-{i}",
                     max_tokens=2, logprobs=5)[0] for i in range(2)]
    graphs = [report(o).get("cuda_graphs") for o in outs]
    assert graphs == ["captured", "replayed"], [report(o) for o in outs]
    assert max_logprob_gap(top_logprobs(outs[0]), top_logprobs(outs[1])) < LOGPROB_TOL


def test_profiled_blend_and_store_report_their_times(engine, chunks, tokenizer):
    """A profiled blend (`profile`: stages timed by CUDA events) reports so, with stages that add up to no more than
    the blend (each counted once) and its chunk KV's copies from pinned memory, and gives the same logprobs as one
    that is not; a stored prompt's report says how long storing held its step."""
    _, _, llm = engine
    prompt, spans = prompt_with(chunks, tokenizer)
    outs = [generate(llm, [prompt], kvblend={"chunks": spans, "profile": profile}, salt=f"profile-{profile}",
                     max_tokens=2, logprobs=5)[0] for profile in (False, True)]
    plain, profiled = (report(o) for o in outs)
    assert profiled.get("profiled") is True and "profiled" not in plain, (plain, profiled)
    assert 0 < sum(profiled["stage_ms"].values()) <= profiled["blend_ms"], profiled
    h2d = profiled["h2d"]
    assert h2d["pinned"] and h2d["bytes"] > 0 and h2d["GBps"] > 0 and "h2d" not in plain, profiled
    assert max_logprob_gap(top_logprobs(outs[0]), top_logprobs(outs[1])) < LOGPROB_TOL
    stored = report(generate(llm, [prompt[:300]], kvblend={"store_prompt": True}, max_tokens=2)[0])
    assert stored["reason"] == "store_prompt" and stored["stored_spans"] == 1 and stored["store_ms"] >= 0, stored


@pytest.fixture(scope="module")
def smollm2(model_dir, tmp_path_factory):
    if not any(model_dir.glob("*.safetensors")):
        pytest.skip(f"{model_dir} holds no weights (on the device: benchmarks/device/smollm2.sh carries SmolLM2's)")
    llm = start_llm(model_dir, {"mode": "blend", "store_dir": str(tmp_path_factory.mktemp("smollm2-store"))},
                    engine_args=GPU_ENGINE_ARGS)
    yield llm
    stop_llm(llm)


def test_smollm2_kl_gap_closed_on_gpu(smollm2, tokenizer):
    stored = fidelity_chunks(tokenizer)[:8]
    generate(smollm2, [list(t) for t in stored], kvblend={"store_prompt": True}, max_tokens=1)
    kl = kl_gap_closed(smollm2, stored, chat_template(tokenizer), tokenizer)
    assert kl["full_prefill"] < kl["cacheblend"] < kl["full_reuse"]
    assert kl["closed"] >= 0.5
