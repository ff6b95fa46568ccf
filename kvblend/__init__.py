"""kvblend: CacheBlend-style reuse of retrieved chunks' KV caches inside vLLM.

    from kvblend import RAGPipeline, PipelineConfig, CachedRetriever

The entry points load on first use (module __getattr__), so `import kvblend` imports neither torch nor vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RAGPipeline": "kvblend.rag.pipeline",
    "PipelineConfig": "kvblend.rag.config",
    "CachedRetriever": "kvblend.retrieval.langchain",
}
__all__ = ["CachedRetriever", "PipelineConfig", "RAGPipeline"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvblend' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
