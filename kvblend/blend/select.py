"""Token selection: which chunk tokens keep being recomputed after a check layer."""

from __future__ import annotations

import math

import torch

from kvblend.triton_kernels import kv_deviation


def select_count(ratio: float, num_tokens: int) -> int:
    """How many of `num_tokens` chunk tokens a recompute ratio keeps (rounded half up)."""
    return min(num_tokens, math.floor(ratio * num_tokens + 0.5))


def deviation_scores(
    k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, kind: str
) -> torch.Tensor:
    """Per-token squared L2 deviation between fresh and reused K and/or V, fp32 [tokens]."""
    return scores_from_parts(deviation_parts(k_new, v_new, k_old, v_old, kind), kind)


def deviation_parts(
    k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, kind: str
) -> torch.Tensor:
    """The per-token sums over heads a `kind` score is made of, fp32 [parts, tokens] (K's and V's squared L2 for
    "kv"): sums a tensor-parallel rank takes over its own heads, to be added over the ranks before scoring."""
    if kind == "none":
        return torch.empty(0, k_new.shape[0], dtype=torch.float32, device=k_new.device)
    dev_k, dev_v = kv_deviation(k_new, v_new, k_old, v_old)
    return torch.stack({"k": (dev_k,), "v": (dev_v,), "kv": (dev_k, dev_v)}[kind])


def scores_from_parts(parts: torch.Tensor, kind: str) -> torch.Tensor:
    """`deviation_parts` (summed over every head) as the `kind` score, fp32 [tokens] ("kv": each part normalised
    by its mean)."""
    if kind == "none":
        return torch.ones(parts.shape[1], dtype=torch.float32, device=parts.device)
    if kind == "kv":
        return parts[0] / parts[0].mean().clamp_min(1e-30) + parts[1] / parts[1].mean().clamp_min(1e-30)
    return parts[0]


def select_tokens(scores: torch.Tensor, count: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the `count` highest scores; `forced` indices (a bool mask) are taken first. Device
    ops of host-known sizes only: no host sync."""
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    if forced is not None:
        scores = torch.where(forced, torch.inf, scores)
    return torch.topk(scores, min(count, scores.numel()), sorted=False).indices.sort().values


def mask_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the True entries of `mask`, whose number `count` the caller knows: the static-shape
    (sync-free) form of `mask.nonzero()`."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


def attention_received(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Mean softmax attention each key receives from the queries q [n, heads, D] (GQA), fp32 [keys]. The query
    heads of one KV head multiply its keys together, so K is never expanded to every head."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    qf = q.float().transpose(0, 1).reshape(kv_heads, heads // kv_heads * n, dim)
    scores = qf @ k.float().transpose(0, 1).transpose(1, 2) / dim**0.5
    scores = scores.view(kv_heads, heads // kv_heads, n, -1)
    scores = scores.masked_fill(k_pos[None, None, None, :] > q_pos[None, None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=(0, 1, 2))


def random_scores(num_tokens: int, seed: int, layer: int, device: torch.device) -> torch.Tensor:
    """Uniform random scores (the control policy), reproducible per seed and layer."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    return torch.rand(num_tokens, generator=g).to(device)

