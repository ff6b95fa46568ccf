"""Where a blend's per-layer K/V live and how the active rows attend over them.

`DenseKV` keeps the whole prompt's K/V as [layers, tokens, kv_heads, head_dim] tensors and attends with
kvblend's kernels (the reference path: tests, evaluation, the GPU benchmark). A host engine passes its own
target instead, e.g. vLLM's paged cache and attention backend (`kvblend.vllm.paged_target.PagedKV`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from kvblend.model.spec import ModelSpec
from kvblend.triton_kernels import AttentionBands, attention_bands, sparse_query_attention


class KVTarget(Protocol):
    """layer(i) -> (K, V) [tokens, kv_heads, head_dim] buffers the engine fills for layer i; commit(i) once every
    row of layer i is final; attend(...) -> [active rows, heads * head_dim]; rows_changed() when the active set
    shrinks; k and v: the whole prompt's KV after the run, or None where it went elsewhere."""

    k: torch.Tensor | None
    v: torch.Tensor | None

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def commit(self, layer: int) -> None: ...

    def attend(self, layer: int, q: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
               last: bool) -> torch.Tensor: ...

    def rows_changed(self) -> None: ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of all T rows over themselves. On CUDA the KV heads are expanded first: SDPA's flash
    kernel takes no GQA and wants a batch dimension; otherwise SDPA falls back to materialising T x T scores."""
    group = q.shape[1] // k.shape[1]
    if q.is_cuda and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def attend_rows(q: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                scale: float | None = None, bands: AttentionBands | None = None) -> torch.Tensor:
    """Attention of the active `rows` (queries q [rows, heads, head_dim]) over every row's K/V [tokens, kv_heads,
    head_dim] at `positions`, causally by position: SDPA's causal kernel when every row is active, else the sparse-
    query kernel, which reads each query tile's keys once however scattered the rows are. `bands`: the CPU path's
    masks for these rows, when the caller keeps them."""
    if rows.numel() == K.shape[0]:
        return causal_attention(q, K, V, scale)
    return sparse_query_attention(q, positions[rows], K, V, positions, scale=scale, keys_sorted=True, bands=bands)


class DenseKV:
    """Every layer's K/V of the prompt in dense tensors; attention by SDPA (all rows) or sparse-query attention."""

    def __init__(self, spec: ModelSpec, num_tokens: int, dtype: torch.dtype, device: torch.device,
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`buffers`: K and V to fill (e.g. a CUDA-graph workspace), else new ones."""
        if buffers is None:
            k = torch.empty(spec.num_layers, num_tokens, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device)
            buffers = k, torch.empty_like(k)
        self.k, self.v = buffers
        self._bands: AttentionBands | None = None  # CPU attention masks of the current active rows

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def commit(self, layer: int) -> None:
        """Nothing to do: the buffers are the result."""

    def rows_changed(self) -> None:
        self._bands = None

    def attend(self, layer: int, q: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
               last: bool) -> torch.Tensor:
        K, V = self.k[layer], self.v[layer]
        partial = rows.numel() < K.shape[0]
        if partial and self._bands is None and not last and not K.is_cuda:  # CPU masks, shared by these rows' layers
            self._bands = attention_bands(positions[rows], positions, q.dtype, keys_sorted=True)
        return attend_rows(q, rows, positions, K, V, bands=None if last else self._bands)
