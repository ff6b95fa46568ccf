"""The blend's KV target inside vLLM: the request's own paged blocks.

Each layer's rows (chunk KV re-rotated, recomputed rows, exact prefix spans) are built in one dense staging pair,
then written into the request's slots in one cache-update call. How the active rows attend depends on the device:
- CPU: through vLLM's backend (its metadata builder and kernel). A run of consecutive active rows [a, b) is one
  query sequence of length b - a with context b, all runs sharing the request's block table, so each row attends
  to exactly its causal prefix with no dense mask.
- GPU: with kvblend's sparse-query kernel over the staging pair, which holds every row of the layer. CacheBlend's
  selected rows are scattered, so vLLM's backend would see thousands of one-row sequences, each reading its whole
  prefix's KV like a decode: measured on an H100 (vLLM 0.26, FLASH_ATTN, a 32k-token prompt, 4.8k active rows),
  1.9 s of attention per request, 1.6x vLLM's whole prefill. The kernel reads each tile of queries' keys once.
  Layers with a sliding window, a logit soft cap, ALiBi or sinks keep vLLM's backend (the kernel computes none).
"""

from __future__ import annotations

import torch

from kvblend.blend.kv_target import attend_rows
from kvblend.vllm.paged import PagedCache, slots_for

# Backends whose metadata builder takes the runs in any order. FlashInfer's splits a batch into decodes (query
# length 1) and prefills assuming the decodes come first, which a blend's isolated active rows break.
BLEND_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


def row_runs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths and ends (exclusive) of the runs of consecutive values in sorted `rows`."""
    n = rows.numel()
    breaks = torch.nonzero(rows[1:] != rows[:-1] + 1).squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks.cpu()])
    ends = torch.cat([breaks.cpu(), torch.tensor([n])])
    return ends - starts, rows.cpu()[ends - 1] + 1


def attention_metadata(builder, rows: torch.Tensor, block_ids: list[int], block_size: int, device: torch.device):
    """The backend's metadata for rows attending causally over one request's blocks: one sequence per run."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    lengths, ends = row_runs(rows)
    num_runs = lengths.numel()
    query_start = torch.zeros(num_runs + 1, dtype=torch.int32)
    query_start[1:] = torch.cumsum(lengths, 0)
    seq_lens = ends.to(torch.int32)
    table = torch.tensor(block_ids, dtype=torch.int32)[None].expand(num_runs, -1).contiguous()
    common = CommonAttentionMetadata(
        query_start_loc=query_start.to(device),
        query_start_loc_cpu=query_start,
        seq_lens=seq_lens.to(device),
        num_reqs=num_runs,
        num_actual_tokens=rows.numel(),
        max_query_len=int(lengths.max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=table.to(device),
        slot_mapping=slots_for(block_ids, 0, int(seq_lens.max()), block_size)[rows.cpu()].to(device),
        causal=True,
        seq_lens_cpu_upper_bound=seq_lens,
    )
    return builder.build(common_prefix_len=0, common_attn_metadata=common)


def plain_softmax(impl) -> bool:
    """Whether vLLM's attention impl computes plain causal softmax attention (no sliding window, logit soft cap,
    ALiBi or sinks), which kvblend's sparse-query kernel reproduces given the impl's scale."""
    window = getattr(impl, "sliding_window", None)
    return (window in (None, -1, (-1, -1)) and not getattr(impl, "logits_soft_cap", None)
            and getattr(impl, "alibi_slopes", None) is None and getattr(impl, "sinks", None) is None)


def attention_path(caches: list[PagedCache], wanted: str = "auto") -> str:
    """The kernel a blend attends with, "vllm" or "kvblend", for ConnectorConfig's blend_attention `wanted`:
    "auto" takes kvblend's on a GPU where every layer is plain softmax attention, vLLM's otherwise."""
    plain = all(plain_softmax(c.layer.impl) for c in caches)
    if wanted == "kvblend" and not plain:
        raise ValueError("blend_attention 'kvblend' computes plain softmax attention, and this model's layers use a "
                         "sliding window, a logit soft cap, ALiBi or sinks: use 'vllm' or 'auto'")
    if wanted != "auto":
        return wanted
    return "kvblend" if caches[0].kv.device.type == "cuda" and plain else "vllm"


class PagedKV:
    """KVTarget on one request's paged blocks: rows [write_from, num_tokens) are written, all rows attended."""

    k = None
    v = None

    def __init__(self, caches: list[PagedCache], builder, block_ids: list[int], write_from: int,
                 num_tokens: int, attention: str = "vllm",
                 staging: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`attention`: "vllm" (its backend over the paged blocks) or "kvblend" (the sparse-query kernel over the
        staging pair), as `attention_path` resolves it. `staging`: the K/V pair [num_tokens, kv_heads, head_dim]
        to build layers in (a CUDA-graph workspace), else new ones."""
        first = caches[0]
        self.attention = attention
        self.caches, self.builder, self.block_ids = caches, builder, list(block_ids)
        self.block_size, self.write_from = first.block_size, write_from
        self.device = first.kv.device
        if staging is None:
            k = torch.empty(num_tokens, first.num_kv_heads, first.head_dim, dtype=first.kv.dtype, device=self.device)
            staging = k, torch.empty_like(k)
        self.K, self.V = staging
        # on the cache's device once: a host tensor would be copied, and the stream synchronised, at every layer
        self.slots = slots_for(block_ids, write_from, num_tokens, self.block_size).to(self.device)
        self._metadata = None

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One staging pair reused by every layer: each layer rewrites every row before it is committed."""
        return self.K, self.V

    def commit(self, layer: int) -> None:
        self.caches[layer].write(self.K[self.write_from :], self.V[self.write_from :], self.slots)

    def rows_changed(self) -> None:
        self._metadata = None

    def attend(self, layer: int, q: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
               last: bool) -> torch.Tensor:
        """Attention of the active rows (`positions` are the rows themselves here). vLLM's metadata is built once
        per active set and shared by its layers; the last layer's trimmed rows get their own."""
        attn = self.caches[layer].layer
        if self.attention == "kvblend":
            out = attend_rows(q.reshape(q.shape[0], attn.num_heads, attn.head_size), rows, positions, self.K, self.V,
                              scale=attn.impl.scale)
            return out.reshape(q.shape[0], -1)
        if last:
            metadata = attention_metadata(self.builder, rows, self.block_ids, self.block_size, self.device)
        else:
            if self._metadata is None:
                self._metadata = attention_metadata(self.builder, rows, self.block_ids, self.block_size, self.device)
            metadata = self._metadata
        cache = self.caches[layer]
        out = torch.empty(q.shape[0], attn.num_heads, attn.head_size, dtype=q.dtype, device=q.device)
        attn.impl.forward(attn, q.contiguous(), None, None, cache.kv, metadata, output=out)
        return out.reshape(q.shape[0], -1)
