"""Per-request kvblend parameters, carried in vLLM's `kv_transfer_params` under the key "kvblend".

Pass them as `SamplingParams(extra_args={"kv_transfer_params": {"kvblend": {...}}})`:
  chunks       [[start, length], ...] spans of the prompt that are cached chunks (the explicit layout);
               without it the connector discovers cached chunks in the prompt by content hash
  mode         "blend" | "storage" | "off" (default: the connector's mode)
  namespace    the chunks' store namespace, a plain name (default: the connector's)
  tenant_secret  the tenant's secret (at least 16 chars): keys are made in the tenant's own namespace, derived
               from the secret and the namespace with the server's deployment secret (store/key.py
               key_namespace); without it, in the plain namespace, which every request without a secret shares
  store_prompt true: store the whole prompt's KV as one chunk computed alone (precompute through vLLM)
  policy, ratio  override the connector's blend policy and recompute ratio for this request
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvblend.blend.config import DEFAULT_POLICY, DEFAULT_RATIO, BlendConfig
from kvblend.store.key import check_namespace_name, check_tenant_secret, key_namespace

KEY = "kvblend"
FIELDS = ("mode", "chunks", "namespace", "tenant_secret", "store_prompt", "policy", "ratio")


@dataclass(frozen=True)
class RequestParams:
    mode: str | None = None
    chunks: tuple[tuple[int, int], ...] | None = None
    namespace: str | None = None
    tenant_secret: str | None = field(default=None, repr=False)
    store_prompt: bool = False
    policy: str | None = None
    ratio: float | None = None

    def key_namespace(self, default: str, server_key: str | None) -> str:
        """The namespace this request's keys are made in (its tenant's, if it carries a tenant secret)."""
        return key_namespace(self.namespace or default, self.tenant_secret, server_key)


def parse_params(kv_transfer_params: dict | None, prompt_len: int) -> RequestParams:
    """Validate a request's kvblend parameters against its prompt; raise ValueError naming the problem."""
    raw = (kv_transfer_params or {}).get(KEY) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"kv_transfer_params['{KEY}'] must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
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
    namespace, secret = raw.get("namespace"), raw.get("tenant_secret")
    if namespace is not None:
        check_namespace_name(namespace)
    if secret is not None:
        check_tenant_secret(secret)
    policy, ratio = raw.get("policy"), raw.get("ratio")
    if policy is not None or ratio is not None:  # BlendConfig validates both
        BlendConfig(policy=DEFAULT_POLICY if policy is None else policy,
                     ratio=DEFAULT_RATIO if ratio is None else float(ratio))
    return RequestParams(mode=mode, chunks=chunks, namespace=namespace, tenant_secret=secret,
                         store_prompt=bool(raw.get("store_prompt", False)), policy=policy,
                         ratio=None if ratio is None else float(ratio))


def request_params(namespace: str | None = None, tenant_secret: str | None = None, **values) -> dict:
    """kv_transfer_params carrying these kvblend parameters (None namespace or secret: left out)."""
    where = {k: v for k, v in (("namespace", namespace), ("tenant_secret", tenant_secret)) if v is not None}
    return {KEY: {**values, **where}}


def blend_params(chunk_spans: list[tuple[int, int]], namespace: str | None = None, tenant_secret: str | None = None,
                 **overrides) -> dict:
    """kv_transfer_params for a prompt with an explicit chunk layout (what RAGPipeline sends)."""
    return request_params(namespace, tenant_secret, mode="blend",
                          chunks=[[int(s), int(n)] for s, n in chunk_spans], **overrides)
