"""The vLLM engine a RAGPipeline drives: started with the kvblend connector, warmed up, streamed, shut down."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

from kvblend.blend.prompt import PromptTemplate
from kvblend.model.embedded import model_config
from kvblend.model.spec import spec_from_config
from kvblend.model.tokenizer import encode
from kvblend.rag.config import ENGINE_REDIS_URL_ENV, PipelineConfig
from kvblend.rag.kv_space import check_memory, cpu_kv_bytes, kv_space_args, weights_bytes
from kvblend.rag.prompt import build_rag_prompt
from kvblend.vllm.model_hook import CONNECTOR_MODULES, LOAD_FORMAT

log = logging.getLogger(__name__)
CONNECTOR = {"kv_connector": "KVBlendConnector", "kv_connector_module_path": CONNECTOR_MODULES["KVBlendConnector"],
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
WARM_UP_TEXT = ("This short request runs once when the engine starts. The kvblend connector compares the KV cache "
                "that vLLM computes for it with its own prefill of the same tokens, and turns blending on when "
                "the two agree.")


def configure_vllm_logging(level: str = "WARNING") -> None:
    """vLLM's own log level, and its logs to stderr (stdout stays for answers); call before vLLM is imported.
    Variables already set in the environment win."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def engine_kwargs(model_dir: str | os.PathLike, config: PipelineConfig, given: dict | None = None) -> dict:
    """vLLM.LLM's arguments besides the model and the connector: the config's and those `given` elsewhere (`kvblend
    serve`'s vLLM flags), with the KV space sized for max_model_len x max_num_seqs unless they size it themselves
    (kv_space.SIZING_ARGS)."""
    kwargs = {**config.engine_kwargs, **(given or {})}
    return {**kwargs, **kv_space_args(spec_from_config(model_config(model_dir), config.dtype), kwargs)}


def engine_env(config: PipelineConfig) -> dict[str, str]:
    """Environment variables the engine's connector reads: the Redis URL (ENGINE_REDIS_URL_ENV, which
    `config.connector_extra()` names), so it never enters vLLM's logged config."""
    return {ENGINE_REDIS_URL_ENV: config.redis_url} if config.redis_url else {}


def require_memory(model_dir: str | os.PathLike, kwargs: dict) -> None:
    """On CPU, raise NotEnoughMemory unless free memory holds the engine's KV space and the weights (checked before
    the engine starts: vLLM's own failure comes late, or takes most of the host)."""
    import psutil
    from vllm.platforms import current_platform

    kv_bytes = cpu_kv_bytes(kwargs) if current_platform.is_cpu() else None
    if kv_bytes is not None:
        check_memory(kv_bytes, weights_bytes(model_dir), psutil.virtual_memory().available, kwargs)


def start_llm(model_dir: str | os.PathLike, config: PipelineConfig):
    """A `vllm.LLM` serving `model_dir` with the kvblend connector in blend mode, loaded through kvblend's load
    format so the blend runs on vLLM's own modules. On CPU, a machine whose free memory cannot hold the KV space
    and the weights gets NotEnoughMemory before the engine starts. The Redis URL reaches the engine's connector
    through this process's environment (engine_env, inherited by the engine processes)."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = engine_kwargs(model_dir, config)
    require_memory(model_dir, kwargs)
    os.environ.update(engine_env(config))
    kv = KVTransferConfig(**CONNECTOR, kv_connector_extra_config=config.connector_extra())
    log.info("starting vLLM on %s with the kvblend connector", model_dir)
    return LLM(model=str(model_dir), kv_transfer_config=kv, load_format=LOAD_FORMAT, **kwargs)


def warm_up_prompt(tokenizer, template: PromptTemplate) -> list[int]:
    """Token ids of the short plain prompt an engine runs once at start, so the connector's self-check (which
    needs vLLM's own prefill of a first plain prompt) runs before any query and the first query can blend."""
    from kvblend.vllm.scheduler import SELF_CHECK_TOKENS

    question = encode(tokenizer, "Is blending on?")
    ids = build_rag_prompt(template, [encode(tokenizer, WARM_UP_TEXT)], (), question).token_ids
    if len(ids) < SELF_CHECK_TOKENS:
        raise ValueError(f"the warm-up prompt has {len(ids)} tokens, the self-check needs {SELF_CHECK_TOKENS}")
    return ids


def warm_up_params():
    """One greedy token, kvblend off: the warm-up request is plain vLLM."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": {"kvblend": {"mode": "off"}}})


def warm_up(llm, tokenizer, template: PromptTemplate) -> None:
    """Run the warm-up prompt through an offline `vllm.LLM`."""
    llm.generate([{"prompt_token_ids": warm_up_prompt(tokenizer, template)}], warm_up_params(), use_tqdm=False)


def stream_outputs(llm, prompt: dict, params) -> Iterator:
    """RequestOutputs of one request as the engine produces them (params.output_kind DELTA gives text deltas).
    Drives `llm.llm_engine` directly (the offline LLM has no streaming call); an abandoned stream is aborted."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    engine = llm.llm_engine
    renderer = engine.renderer
    (engine_input,) = renderer.render_cmpl([parse_model_prompt(llm.model_config, prompt)],
                                           renderer.default_cmpl_tok_params)
    request_id = f"kvblend-stream-{uuid.uuid4().hex[:12]}"
    engine.add_request(request_id, engine_input, params)
    finished = False
    try:
        while not finished and engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id:
                    finished = output.finished
                    yield output
    finally:
        if not finished:
            engine.abort_request([request_id])


def stop_llm(llm) -> None:
    """Shut the engine core (and its worker processes) down."""
    llm.llm_engine.engine_core.shutdown()
