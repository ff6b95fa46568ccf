"""CacheBlend's KV deviation: how far reused K/V drift from recomputed K/V, per token, at the check layer.

The tokens with the largest deviation are the ones selected for recompute in the following layers.
"""

from __future__ import annotations

import torch

from kvblend.triton_kernels.checks import check_kv_pair
from kvblend.triton_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _kv_deviation_kernel(
        k_a, v_a, k_b, v_b, dev_k, dev_v, num_tokens,
        k_a_stride, v_a_stride, k_b_stride, v_b_stride,
        FEATURES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_ok = token < num_tokens
        row = token.to(tl.int64)[:, None]
        sum_k = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        sum_v = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        for start in range(0, FEATURES, BLOCK_F):
            feature = start + tl.arange(0, BLOCK_F)[None, :]
            mask = token_ok[:, None] & (feature < FEATURES)
            ka = tl.load(k_a + row * k_a_stride + feature, mask=mask, other=0.0).to(tl.float32)
            kb = tl.load(k_b + row * k_b_stride + feature, mask=mask, other=0.0).to(tl.float32)
            va = tl.load(v_a + row * v_a_stride + feature, mask=mask, other=0.0).to(tl.float32)
            vb = tl.load(v_b + row * v_b_stride + feature, mask=mask, other=0.0).to(tl.float32)
            sum_k += (ka - kb) * (ka - kb)
            sum_v += (va - vb) * (va - vb)
        tl.store(dev_k + token, tl.sum(sum_k, axis=1), mask=token_ok)
        tl.store(dev_v + token, tl.sum(sum_v, axis=1), mask=token_ok)


def kv_deviation(
    k_a: torch.Tensor, v_a: torch.Tensor, k_b: torch.Tensor, v_b: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token squared L2 distance (over heads and head_dim, fp32) of K and of V: (dev_k, dev_v), each [T].

    One fused pass reads the four [T, kv_heads, head_dim] tensors once.
    """
    check_kv_pair(k_a, v_a, "kv_deviation a")
    check_kv_pair(k_b, v_b, "kv_deviation b")
    if k_a.shape != k_b.shape or k_a.device != k_b.device:
        raise ValueError(f"kv_deviation: a {tuple(k_a.shape)} and b {tuple(k_b.shape)} differ in shape or device")
    if not use_triton(backend, k_a, v_a, k_b, v_b):
        return kv_deviation_ref(k_a, v_a, k_b, v_b)
    num_tokens = k_a.shape[0]
    features = k_a.shape[1] * k_a.shape[2]
    k_a, v_a, k_b, v_b = (_rows_contiguous(t) for t in (k_a, v_a, k_b, v_b))
    dev_k = torch.empty(num_tokens, dtype=torch.float32, device=k_a.device)
    dev_v = torch.empty_like(dev_k)
    if num_tokens == 0:
        return dev_k, dev_v
    block_f = min(triton.next_power_of_2(features), 512)
    block_t = 2048 // block_f
    _kv_deviation_kernel[(triton.cdiv(num_tokens, block_t),)](
        k_a, v_a, k_b, v_b, dev_k, dev_v, num_tokens,
        k_a.stride(0), v_a.stride(0), k_b.stride(0), v_b.stride(0),
        FEATURES=features, BLOCK_T=block_t, BLOCK_F=block_f,
    )
    return dev_k, dev_v


def kv_deviation_ref(
    k_a: torch.Tensor, v_a: torch.Tensor, k_b: torch.Tensor, v_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `kv_deviation`."""
    dev_k = (k_a.float() - k_b.float()).square().sum(dim=(1, 2))
    dev_v = (v_a.float() - v_b.float()).square().sum(dim=(1, 2))
    return dev_k, dev_v


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when each token's heads x head_dim are one contiguous run, else a contiguous copy."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()
