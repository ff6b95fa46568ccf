"""RAGPipeline sizes vLLM's KV space from max_model_len x max_num_seqs (overridable), and a machine too small for
it gets a clear error before any engine starts."""

import pytest

from kvblend.cpu import cpu_compute_dtype
from kvblend.model.spec import load_spec
from kvblend.rag.config import PipelineConfig
from kvblend.rag.engine import engine_kwargs
from kvblend.rag.kv_space import (
    GIB,
    SIZING_ARGS,
    NotEnoughMemory,
    check_memory,
    cpu_kv_bytes,
    kv_space_bytes,
    weights_bytes,
)


def test_kv_space_is_sized_from_the_model_and_the_sequences(model_dir):
    spec = load_spec(model_dir, "bfloat16")  # SmolLM2-135M: 30 layers, 3 KV heads of 64, bf16
    per_token = 2 * 30 * 3 * 64 * 2
    assert kv_space_bytes(spec, 4096, 4) == per_token * 4096 * 4
    assert kv_space_bytes(spec, 1000, 2) == per_token * 1024 * 2  # whole blocks
    assert kv_space_bytes(spec.with_dtype("float32"), 4096, 1) == 2 * per_token * 4096
    with pytest.raises(ValueError, match="must be positive"):
        kv_space_bytes(spec, 4096, 0)


def test_the_pipeline_asks_vllm_for_its_size_unless_told_otherwise(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    spec = load_spec(model_dir, cpu_compute_dtype())  # DEFAULT_ENGINE_ARGS' dtype
    dirs = {"index_dir": tmp_path / "i", "store_dir": tmp_path / "s"}
    kwargs = engine_kwargs(model_dir, PipelineConfig(**dirs))
    assert kwargs["kv_cache_memory_bytes"] == kv_space_bytes(spec, 4096, 4) < GIB  # 0.35 GiB in bf16, 0.70 in fp32
    assert cpu_kv_bytes(kwargs) == kwargs["kv_cache_memory_bytes"]
    small = engine_kwargs(model_dir, PipelineConfig(**dirs, top_k=2, chunk_tokens=256,
                                                    engine_args={"max_model_len": 1024, "max_num_seqs": 2}))
    assert small["kv_cache_memory_bytes"] == kv_space_bytes(spec, 1024, 2)
    for name, value in (("kv_cache_memory_bytes", 3 << 30), ("gpu_memory_utilization", 0.5)):
        kwargs = engine_kwargs(model_dir, PipelineConfig(**dirs, engine_args={name: value}))
        assert kwargs[name] == value and [k for k in SIZING_ARGS if k in kwargs] == [name]
    assert cpu_kv_bytes(kwargs) is None  # vLLM sizes it from gpu_memory_utilization, as asked
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's legacy CPU setting wins, as vLLM decides
    assert cpu_kv_bytes(kwargs) == 2 * GIB


def test_a_machine_too_small_gets_a_clear_error(model_dir):
    weights = weights_bytes(model_dir)
    assert weights > 100 << 20  # the 135M model's bf16 safetensors
    check_memory(GIB, weights, 2 * GIB, {"max_model_len": 4096, "max_num_seqs": 4})
    with pytest.raises(NotEnoughMemory, match=r"needs 1\.\d\d GiB \(1\.00 GiB of KV space for max_model_len 4096 x "
                                              r"max_num_seqs 4, plus 0\.\d\d GiB of weights\) but only 1\.00 GiB"):
        check_memory(GIB, weights, GIB, {"max_model_len": 4096, "max_num_seqs": 4})


@pytest.mark.slow
def test_the_pipeline_refuses_to_start_an_engine_the_machine_cannot_hold(model_dir, tmp_path, monkeypatch):
    """Real free memory, real sizing: a million sequences cannot fit; no engine starts."""
    from kvblend.rag.pipeline import RAGPipeline

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    rag = RAGPipeline(model_dir=model_dir, index_dir=tmp_path / "i", store_dir=tmp_path / "s",
                      engine_args={"max_num_seqs": 1_000_000})
    with pytest.raises(NotEnoughMemory, match="lower max_model_len or max_num_seqs"):
        rag.llm  # noqa: B018 (starting the engine is the point)
    assert rag._llm is None
