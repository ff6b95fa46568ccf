"""Per-request kvblend parameters, carried in vLLM's `kv_transfer_params` under the key "kvblend".

Pass them as `SamplingParams(extra_args={"kv_transfer_params": {"kvblend": {...}}})`:
  chunks       [[start, length], ...] spans of the prompt that are cached chunks (the explicit layout);
               without it the connector discovers cached chunks in the prompt by content hash
  mode         "blend" | "storage" | "off" (default: the connector's mode)
  namespace    the chunks' store namespace (default: the connector's)
  store_prompt true: store the whole prompt's KV as one chunk computed alone (precompute through vLLM)
  policy, ratio  override the connector's blend policy and recompute ratio for this request
  prefetch     false: do not move this request's stored KV whole into the memory tier before its layer reads
               (default: the connector's `prefetch`; for measuring what prefetch saves)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvblend.blend.config import DEFAULT_POLICY, DEFAULT_RATIO, BlendConfig

KEY = "kvblend"


@dataclass(frozen=True)
class RequestParams:
    mode: str | None = None
    chunks: tuple[tuple[int, int], ...] | None = None
    namespace: str | None = None
    store_prompt: bool = False
    policy: str | None = None
    ratio: float | None = None
    prefetch: bool | None = None


def parse_params(kv_transfer_params: dict | None, prompt_len: int) -> RequestParams:
    """Validate a request's kvblend parameters against its prompt; raise ValueError naming the problem."""
    raw = (kv_transfer_params or {}).get(KEY) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"kv_transfer_params['{KEY}'] must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"mode", "chunks", "namespace", "store_prompt", "policy", "ratio", "prefetch"})
    if unknown:
        raise ValueError(f"unknown kvblend request parameters {unknown}")
    mode = raw.get("mode")
    if mode not in (None, "blend", "storage", "off"):
        raise ValueError(f"kvblend mode must be blend, storage or off, got {mode!r}")
    chunks = None
    if raw.get("chunks") is not None:
        chunks = tuple((int(s), int(n)) for s, n in raw["chunks"])
        end = 0
        for start, length in chunks:
            if length <= 0 or start < end or start + length > prompt_len:
                raise ValueError(f"chunk span ({start}, {length}) is empty, overlaps or leaves the {prompt_len}-token prompt")
            end = start + length
    prefetch = raw.get("prefetch")
    if prefetch not in (None, True, False):
        raise ValueError(f"kvblend prefetch must be true or false, got {prefetch!r}")
    policy, ratio = raw.get("policy"), raw.get("ratio")
    if policy is not None or ratio is not None:  # BlendConfig validates both
        BlendConfig(policy=DEFAULT_POLICY if policy is None else policy,
                     ratio=DEFAULT_RATIO if ratio is None else float(ratio))
    return RequestParams(mode=mode, chunks=chunks, namespace=raw.get("namespace"),
                         store_prompt=bool(raw.get("store_prompt", False)), policy=policy,
                         ratio=None if ratio is None else float(ratio), prefetch=prefetch)


def blend_params(chunk_spans: list[tuple[int, int]], namespace: str | None = None, **overrides) -> dict:
    """kv_transfer_params for a prompt with an explicit chunk layout (what RAGPipeline sends)."""
    params = {"mode": "blend", "chunks": [[int(s), int(n)] for s, n in chunk_spans], **overrides}
    if namespace is not None:
        params["namespace"] = namespace
    return {KEY: params}
