"""kvblend: CacheBlend-style reuse of retrieved chunks' KV caches inside vLLM.

    from kvblend import RAGPipeline, PipelineConfig, CachedRetriever

The entry points load on first use (module __getattr__), so `import kvblend` imports neither torch nor vLLM.
"""

from __future__ import annotations

from kvblend.lazy import lazy_exports

_EXPORTS = {
    "RAGPipeline": "kvblend.rag.pipeline",
    "PipelineConfig": "kvblend.rag.config",
    "CachedRetriever": "kvblend.retrieval.langchain",
}
__all__ = ["CachedRetriever", "PipelineConfig", "RAGPipeline"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
