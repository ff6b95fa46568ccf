"""Argument checks shared by the ops: a kernel given a bad index writes outside its buffer, so refuse first."""

from __future__ import annotations

import torch


def check_index_vector(index: torch.Tensor, length: int, name: str) -> None:
    """Refuse anything but a 1-D int64 tensor of `length` elements."""
    if index.dtype != torch.int64 or index.dim() != 1 or index.shape[0] != length:
        raise ValueError(f"{name} must be int64 of shape [{length}], got {index.dtype} {tuple(index.shape)}")


def check_index_ranges(*checks: tuple[torch.Tensor, int, int, str]) -> None:
    """Refuse any (index, low, high, name) whose values fall outside [low, high); one device sync for all."""
    checks = tuple(check for check in checks if check[0].numel())
    if not checks:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(index)) for index, *_ in checks]).tolist()
    for (lo, hi), (_, low, high, name) in zip(bounds, checks):
        if lo < low or hi >= high:
            raise ValueError(f"{name} holds values in [{lo}, {hi}], outside the valid range [{low}, {high})")


def check_kv_pair(k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    """Refuse a K/V pair that is not two [tokens, kv_heads, head_dim] tensors of one shape, dtype and device."""
    if k.dim() != 3 or k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"{name}: K and V must both be [tokens, kv_heads, head_dim] of one dtype and device, "
            f"got {k.dtype} {tuple(k.shape)} on {k.device} and {v.dtype} {tuple(v.shape)} on {v.device}"
        )
