"""`from kvblend import RAGPipeline, PipelineConfig, CachedRetriever`, with `import kvblend` itself staying light."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "vllm", "transformers", "faiss", "redis", "langchain_core", "triton")


def test_import_kvblend_loads_no_heavy_dependency():
    code = f"import sys, kvblend; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_main_entry_points_are_exported_lazily():
    import kvblend
    from kvblend.rag.config import PipelineConfig
    from kvblend.rag.pipeline import RAGPipeline
    from kvblend.retrieval.langchain import CachedRetriever

    assert (kvblend.RAGPipeline, kvblend.PipelineConfig, kvblend.CachedRetriever) == (
        RAGPipeline, PipelineConfig, CachedRetriever)
    assert set(kvblend.__all__) == {"RAGPipeline", "PipelineConfig", "CachedRetriever"} <= set(dir(kvblend))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kvblend.Nope  # noqa: B018
