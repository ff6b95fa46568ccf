"""The blend's KV target inside vLLM: the request's own paged blocks, attended through vLLM's attention backend.

Each layer's rows (chunk KV re-rotated, recomputed rows, exact prefix spans) are written into the request's
slots in one cache-update call; the active rows then attend through the backend's own metadata builder and
kernel. A run of consecutive active rows [a, b) is one query sequence of length b - a with context b, all runs
sharing the request's block table, so each row attends to exactly its causal prefix with no dense mask.
"""

from __future__ import annotations

import torch

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


class PagedKV:
    """KVTarget on one request's paged blocks: rows [write_from, num_tokens) are written, all rows attended."""

    k = None
    v = None

    def __init__(self, caches: list[PagedCache], builder, block_ids: list[int], write_from: int,
                 num_tokens: int) -> None:
        first = caches[0]
        self.caches, self.builder, self.block_ids = caches, builder, list(block_ids)
        self.block_size, self.write_from = first.block_size, write_from
        self.device = first.kv.device
        self.K = torch.empty(num_tokens, first.num_kv_heads, first.head_dim, dtype=first.kv.dtype, device=self.device)
        self.V = torch.empty_like(self.K)
        self.slots = slots_for(block_ids, write_from, num_tokens, self.block_size)
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
        """Attention of the active rows (`positions` are the rows themselves here). The metadata is built once
        per active set and shared by its layers; the last layer's trimmed rows get their own."""
        if last:
            metadata = attention_metadata(self.builder, rows, self.block_ids, self.block_size, self.device)
        else:
            if self._metadata is None:
                self._metadata = attention_metadata(self.builder, rows, self.block_ids, self.block_size, self.device)
            metadata = self._metadata
        cache = self.caches[layer]
        attn = cache.layer
        out = torch.empty(q.shape[0], attn.num_heads, attn.head_size, dtype=q.dtype, device=q.device)
        attn.impl.forward(attn, q.contiguous(), None, None, cache.kv, metadata, output=out)
        return out.reshape(q.shape[0], -1)
