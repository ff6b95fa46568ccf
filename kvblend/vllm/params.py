"""Per-request kvblend parameters, carried in vLLM's `kv_transfer_params` under the key "kvblend".

Pass them as `SamplingParams(extra_args={"kv_transfer_params": {"kvblend": {...}}})`. The key itself asks for
the connector's mode (blend, even with an empty dict); a request without it is served exactly unless the
deployment sets discover_blend (ConnectorConfig.request_mode):
  chunks       [[start, length], ...] spans of the prompt that are cached chunks (the explicit layout);
               without it (and without documents) the connector discovers cached chunks by content hash
  documents    [text or [token ids], ...] the retrieved documents the prompt contains, in prompt order: the
               connector tokenizes each text alone, stripped (kvblend.blend.prompt.chunk_token_ids, the key
               recipe of every chunk) and finds its ids in the prompt, which
               gives the layout when the client sends text (an OpenAI chat request); not with `chunks`
  mode         "blend" | "storage" | "off" (default: the connector's mode)
  namespace    the chunks' store namespace, a plain name (default: the connector's)
  tenant_secret  the tenant's secret (at least 16 chars): keys are made in the tenant's own namespace, derived
               from the secret and the namespace with the server's deployment secret (store/key.py
               key_namespace); without it, in the plain namespace, which every request without a secret shares
  store_prompt true: store the whole prompt's KV as one chunk computed alone (precompute through vLLM)
  policy, ratio  override the connector's blend policy and recompute ratio for this request
  gate_bound   the quality gate's bound for this request: above it the request falls back to a full prefill
               (a number > 0, or "off"; default: the connector's, itself kvblend.blend.gate.DEFAULT_GATE_BOUND
               unless configured); the gate's decision, reason and signal are in the blend report
  gate_raise   the opt-in bound above which the request's ratio is doubled (a number > 0 below gate_bound, or
               "off"; default: the connector's, off unless configured; kvblend.blend.gate.RAISE_BOUND calibrated)
  prefetch     false: do not move this request's stored KV whole into the memory tier before its layer reads
               (default: the connector's `prefetch`; for measuring what prefetch saves)
  profile      true: on a GPU the report's stage_ms are device times (CUDA events, no waits between stages: a
               stage's time includes the device's waits for its chunk KV and for the host's launches; the check
               layers' CUDA graphs are not used) and h2d says how fast the chunk KV crossed to the device; blend_ms
               waits for the device (for finding where a blend's time goes)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from kvblend.blend.config import DEFAULT_POLICY, DEFAULT_RATIO, BlendConfig
from kvblend.blend.gate import check_bound
from kvblend.store.key import check_namespace_name, check_tenant_secret, key_namespace

KEY = "kvblend"
FIELDS = ("mode", "chunks", "documents", "namespace", "tenant_secret", "store_prompt", "policy", "ratio", "prefetch",
          "gate_bound", "gate_raise", "profile")
BLEND_SALT = "kvblend-blend"


def blend_salt() -> str:
    """A vLLM cache salt of one blended request's own: its blended (approximate) KV never serves a plain request
    from vLLM's prefix cache, nor a later blended one (whose answer would then depend on what came before it)."""
    return f"{BLEND_SALT}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class RequestParams:
    mode: str | None = None
    chunks: tuple[tuple[int, int], ...] | None = None
    documents: tuple[str | tuple[int, ...], ...] | None = None
    namespace: str | None = None
    tenant_secret: str | None = field(default=None, repr=False)
    store_prompt: bool = False
    policy: str | None = None
    ratio: float | None = None
    prefetch: bool | None = None
    gate_bound: float | str | None = None  # a bound, "off", or None: the connector's
    gate_raise: float | str | None = None  # likewise
    profile: bool = False

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
    documents = parse_documents(raw.get("documents"))
    if documents is not None and chunks is not None:
        raise ValueError("give either chunks (spans) or documents, not both")
    prefetch = raw.get("prefetch")
    if prefetch not in (None, True, False):
        raise ValueError(f"kvblend prefetch must be true or false, got {prefetch!r}")
    profile = raw.get("profile", False)
    if profile not in (True, False):
        raise ValueError(f"kvblend profile must be true or false, got {profile!r}")
    policy, ratio = raw.get("policy"), raw.get("ratio")
    gate, lift = (gate_param(name, raw.get(name)) for name in ("gate_bound", "gate_raise"))
    if policy is not None or ratio is not None:  # BlendConfig validates them (the bounds: gate_param)
        BlendConfig(policy=DEFAULT_POLICY if policy is None else policy,
                    ratio=DEFAULT_RATIO if ratio is None else float(ratio))
    return RequestParams(mode=mode, chunks=chunks, documents=documents, namespace=namespace, tenant_secret=secret,
                         store_prompt=bool(raw.get("store_prompt", False)), policy=policy,
                         ratio=None if ratio is None else float(ratio), prefetch=prefetch, gate_bound=gate,
                         gate_raise=lift, profile=profile)


def gate_param(name: str, value) -> float | str | None:
    """A request's gate bound: None (the connector's), "off", or a number > 0; raise ValueError naming it."""
    if value is None or value == "off":
        return value
    try:
        check_bound(name, value)
    except ValueError as exc:
        raise ValueError(f'kvblend {exc} (or "off")') from None
    return float(value)


def parse_documents(raw) -> tuple[str | tuple[int, ...], ...] | None:
    """`documents` as a tuple of texts and token-id tuples; raise ValueError naming the bad entry."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ValueError("kvblend documents must be a non-empty list of texts or token-id lists")
    out: list[str | tuple[int, ...]] = []
    for i, doc in enumerate(raw):
        if isinstance(doc, str) and doc.strip():
            out.append(doc)
        elif isinstance(doc, list) and doc and all(isinstance(t, int) and t >= 0 for t in doc):
            out.append(tuple(doc))
        else:
            raise ValueError(f"kvblend document {i} must be a non-empty text or a non-empty list of token ids")
    return tuple(out)


def locate_documents(prompt: list[int], documents: list[list[int]]) -> list[tuple[int, int] | None]:
    """(start, length) of each document's token ids in the prompt, each searched for after the previous one
    found (documents come in prompt order); None where a document does not occur there."""
    found: list[tuple[int, int] | None] = []
    after = 0
    for ids in documents:
        n = len(ids)
        span = next(((i, n) for i in range(after, len(prompt) - n + 1)
                     if prompt[i] == ids[0] and prompt[i : i + n] == ids), None) if n else None
        if span is not None:
            after = span[0] + n
        found.append(span)
    return found


def request_params(namespace: str | None = None, tenant_secret: str | None = None, **values) -> dict:
    """kv_transfer_params carrying these kvblend parameters (None namespace or secret: left out)."""
    where = {k: v for k, v in (("namespace", namespace), ("tenant_secret", tenant_secret)) if v is not None}
    return {KEY: {**values, **where}}


def blend_params(chunk_spans: list[tuple[int, int]], namespace: str | None = None, tenant_secret: str | None = None,
                 **overrides) -> dict:
    """kv_transfer_params for a prompt with an explicit chunk layout (what RAGPipeline sends)."""
    return request_params(namespace, tenant_secret, mode="blend",
                          chunks=[[int(s), int(n)] for s, n in chunk_spans], **overrides)
