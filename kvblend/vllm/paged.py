"""Token KV in and out of one attention layer's paged cache in vLLM, whatever the backend's layout.

Writes go through the backend's own cache-update op (`impl.do_kv_cache_update`), so every CPU ISA layout
(vec, AMX, ...) is handled by the code that defines it. Reads on CPU use the layout's permutation, measured
once per (ISA, block size, head dim) by writing index codes through that same op. Where that permutation is a
plain row-major or transposed tile (vLLM's "vec" layout), whole blocks are copied in and out through strided
views instead (`write_rows`, `read_rows_into`): the op and the gathers cost 5-20x more per row. vLLM's GPU backends
(FLASH_ATTN, TRITON_ATTN, FlashInfer; vLLM 0.26 to 0.32) give each layer a `[num_blocks, kv_heads, block_size,
2 * head_dim]` view, K in the first half of the last dim and V in the second, in whatever stride order vLLM allocated
(NHD or HND): rows are written by one kernel (`paged_kv_write`'s "packed" layout) and read through strided views of
the two halves (`packed_halves`), which needs the cache in the model's dtype (no fp8 scales). Anything else is refused.
"""

from __future__ import annotations

import torch

from kvblend.triton_kernels import paged_kv_write
from kvblend.vllm.compat import cpu_attention_isa

# vLLM's GPU backends whose per-layer cache is [num_blocks, kv_heads, block_size, 2 * head_dim], K then V.
PACKED_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")


def slots_for(block_ids: list[int] | torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Slot of every position in [start, end) of a request whose blocks are `block_ids`."""
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)
    pos = torch.arange(start, end)
    if end > blocks.numel() * block_size:
        raise ValueError(f"positions up to {end} need {(end + block_size - 1) // block_size} blocks, got {blocks.numel()}")
    return blocks[pos // block_size] * block_size + pos % block_size


_PERMUTATIONS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _cpu_permutation(layer, block_size: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[block_size, head_dim] -> flat offset inside the K half and the V half of one (block, head)."""
    key = (cpu_attention_isa(layer), block_size, head_dim, dtype)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS[key] = _probe_cpu_layout(layer, block_size, head_dim, dtype)
    return _PERMUTATIONS[key]


def _probe_cpu_layout(layer, block_size: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if block_size > 256 or head_dim > 256:
        raise ValueError("layout probe encodes offsets in bf16 and supports block_size and head_dim up to 256")
    maps = []
    for codes in (torch.arange(block_size)[:, None].expand(block_size, head_dim),
                  torch.arange(head_dim)[None, :].expand(block_size, head_dim)):
        probe = torch.full((2, 1, block_size, 2 * head_dim), -1.0, dtype=dtype)
        values = codes.to(dtype)[:, None, :].contiguous()
        layer.impl.do_kv_cache_update(layer, values, values, probe, torch.arange(block_size, 2 * block_size))
        maps.append(probe[1, 0].reshape(2, block_size * head_dim).long())
    offsets, dims = maps
    result = []
    for half in (0, 1):
        perm = torch.full((block_size, head_dim), -1, dtype=torch.int64)
        perm[offsets[half], dims[half]] = torch.arange(block_size * head_dim)
        if (perm < 0).any():
            raise ValueError(f"unrecognised CPU KV layout for ISA {cpu_attention_isa(layer)}")
        result.append(perm)
    return result[0], result[1]


def packed_halves(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views [num_blocks, kv_heads, block_size, head_dim] of a GPU backend's packed cache (any strides)."""
    return kv_cache[..., :head_dim], kv_cache[..., head_dim:]


def _tile_view(half: torch.Tensor, perm: torch.Tensor, block_size: int, head_dim: int) -> torch.Tensor | None:
    """[blocks, kv_heads, block_size, head_dim] view of one half (K or V) of a CPU cache, `half` being
    [blocks, kv_heads, block_size * head_dim], if the layout's permutation is a row-major or a transposed tile."""
    grid = torch.arange(block_size * head_dim)
    if torch.equal(perm, grid.view(block_size, head_dim)):
        return half.unflatten(-1, (block_size, head_dim))
    if torch.equal(perm, grid.view(head_dim, block_size).t()):
        return half.unflatten(-1, (head_dim, block_size)).transpose(-1, -2)
    return None


class PagedCache:
    """One layer's paged KV cache: write token-major K/V to slots, read them back."""

    def __init__(self, layer, kv_cache: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int) -> None:
        self.layer, self.kv = layer, kv_cache
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        backend = layer.attn_backend.get_name()
        packed_shape = kv_cache.dim() == 4 and kv_cache.shape[1:] == (num_kv_heads, block_size, 2 * head_dim)
        if backend == "CPU_ATTN" and packed_shape:
            self.kind = "cpu_attn"
            self.k_perm, self.v_perm = _cpu_permutation(layer, block_size, head_dim, kv_cache.dtype)
            self.k_tiles, self.v_tiles = self._tiles()
        elif backend in PACKED_BACKENDS and packed_shape:
            self.kind = "packed"
            self.k_tiles = self.v_tiles = None
            self.k_half, self.v_half = packed_halves(kv_cache, head_dim)
        else:
            raise ValueError(f"unknown paged KV layout {tuple(kv_cache.shape)} of vLLM's {backend} backend on "
                             f"{kv_cache.device} (block_size {block_size}, {num_kv_heads} kv heads, head_dim {head_dim}); "
                             f"kvblend reads and writes the layouts of {', '.join(('CPU_ATTN',) + PACKED_BACKENDS)}")

    def _tiles(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Strided [blocks, kv_heads, block_size, head_dim] views of the K and V halves, (None, None) if the
        layout or the cache tensor's strides do not allow them."""
        n, d = self.block_size, self.head_dim
        try:
            halves = self.kv.view(self.kv.shape[0], self.num_kv_heads, 2, n * d)
        except RuntimeError:  # a non-contiguous cache: the op and the gathers handle it
            return None, None
        k = _tile_view(halves[:, :, 0], self.k_perm, n, d)
        v = _tile_view(halves[:, :, 1], self.v_perm, n, d)
        return (k, v) if k is not None and v is not None else (None, None)

    def _whole_blocks(self, block_ids: list[int], start: int, end: int) -> list[int] | None:
        """The blocks holding positions [start, end) if they fill whole blocks and tile views exist, else None."""
        n = self.block_size
        if self.k_tiles is None or start % n or end % n or end <= start:
            return None
        if end > len(block_ids) * n:
            raise ValueError(f"positions up to {end} need {end // n} blocks, got {len(block_ids)}")
        return block_ids[start // n : end // n]

    def write_rows(self, k: torch.Tensor, v: torch.Tensor, block_ids: list[int], start: int, end: int) -> None:
        """Store K/V [end - start, kv_heads, head_dim] at a request's positions [start, end) (its blocks
        `block_ids`): one strided copy per whole block where the layout allows, else through `write`."""
        if k.shape[0] != end - start or v.shape[0] != end - start:
            raise ValueError(f"{k.shape[0]} K and {v.shape[0]} V rows for positions [{start}, {end})")
        blocks = self._whole_blocks(block_ids, start, end)
        if blocks is None:
            self.write(k, v, slots_for(block_ids, start, end, self.block_size))
            return
        n = self.block_size
        for i, block in enumerate(blocks):
            self.k_tiles[block].copy_(k[i * n : (i + 1) * n].transpose(0, 1))
            self.v_tiles[block].copy_(v[i * n : (i + 1) * n].transpose(0, 1))

    def read_rows_into(self, k: torch.Tensor, v: torch.Tensor, block_ids: list[int], start: int, end: int) -> None:
        """Copy the K/V at a request's positions [start, end) into `k`, `v` [end - start, kv_heads, head_dim]."""
        blocks = self._whole_blocks(block_ids, start, end)
        if blocks is None:
            got_k, got_v = self.read(slots_for(block_ids, start, end, self.block_size))
            k.copy_(got_k)
            v.copy_(got_v)
            return
        n = self.block_size
        for i, block in enumerate(blocks):
            k[i * n : (i + 1) * n].copy_(self.k_tiles[block].transpose(0, 1))
            v[i * n : (i + 1) * n].copy_(self.v_tiles[block].transpose(0, 1))

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store K/V [tokens, kv_heads, head_dim] at `slots` (moved to the cache's device: store entries are on the
        host); on a GPU one kernel writes both halves (`paged_kv_write`, its slots built by the caller, unchecked:
        a range check would wait for the device)."""
        k, v = k.to(self.kv.device, self.kv.dtype).contiguous(), v.to(self.kv.device, self.kv.dtype).contiguous()
        slots = slots.to(self.kv.device)
        if self.kind == "cpu_attn":
            self.layer.impl.do_kv_cache_update(self.layer, k, v, self.kv, slots)
        else:
            paged_kv_write(k, v, self.kv, slots, "packed", check=False)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [tokens, kv_heads, head_dim] stored at `slots` (a copy)."""
        slots = slots.to(self.kv.device)
        if self.kind == "packed":
            block, offset = slots // self.block_size, slots % self.block_size
            return self.k_half[block, :, offset], self.v_half[block, :, offset]
        n, d = self.block_size, self.head_dim
        flat = self.kv.view(-1)
        block, offset = slots // n, slots % n
        heads = torch.arange(self.num_kv_heads)
        half_base = ((block[:, None] * self.num_kv_heads + heads[None, :]) * 2) * (n * d)
        k = flat[half_base[:, :, None] + self.k_perm[offset][:, None, :]]
        v = flat[half_base[:, :, None] + n * d + self.v_perm[offset][:, None, :]]
        return k, v
