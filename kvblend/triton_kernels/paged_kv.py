"""Write token K/V into vLLM's paged KV cache and read it back, for the layouts kvblend serves.

slot = block_id * block_size + offset_in_block; a slot of -1 is vLLM's padding and is skipped on write.
Layouts:
  "flash":    [2, num_blocks, block_size, kv_heads, head_dim]; index 0 holds K, 1 holds V.
  "cpu_attn": [num_blocks, kv_heads, block_size, 2 * head_dim]; each (block, head) region stores K
              transposed as [head_dim, block_size], then V row-major as [block_size, head_dim].
  "packed":   [num_blocks, kv_heads, block_size, 2 * head_dim], K in the first half of the last dim and V in the
              second, in any stride order: each layer's view of vLLM's GPU backends (`kvblend.vllm.paged`). One
              launch writes both halves, where indexed assignment took a block and an offset kernel and one
              scatter per half.
"""

from __future__ import annotations

import torch

from kvblend.triton_kernels.checks import check_index_ranges, check_index_vector, check_kv_pair
from kvblend.triton_kernels.dispatch import HAS_TRITON, use_triton

LAYOUTS = ("flash", "cpu_attn", "packed")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_kv_copy_kernel(
        k, v, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        cache, slots, num_tokens, block_size, num_heads, head_dim,
        v_base, stride_block, stride_head, k_stride_offset, k_stride_dim, v_stride_offset, v_stride_dim,
        TO_CACHE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        slot = tl.load(slots + token, mask=token < num_tokens, other=-1)
        block = (slot // block_size)[:, None, None]
        offset = (slot % block_size)[:, None, None]
        head = tl.arange(0, BLOCK_H)[None, :, None]
        dim = tl.arange(0, BLOCK_D)[None, None, :]
        mask = (slot >= 0)[:, None, None] & (head < num_heads) & (dim < head_dim)
        region = cache + block * stride_block + head * stride_head
        cache_k = region + offset * k_stride_offset + dim * k_stride_dim
        cache_v = region + v_base + offset * v_stride_offset + dim * v_stride_dim
        row = token.to(tl.int64)[:, None, None]
        token_k = k + row * k_stride_t + head * k_stride_h + dim
        token_v = v + row * v_stride_t + head * v_stride_h + dim
        if TO_CACHE:
            tl.store(cache_k, tl.load(token_k, mask=mask), mask=mask)
            tl.store(cache_v, tl.load(token_v, mask=mask), mask=mask)
        else:
            tl.store(token_k, tl.load(cache_k, mask=mask), mask=mask)
            tl.store(token_v, tl.load(cache_v, mask=mask), mask=mask)


def paged_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    backend: str = "auto",
    check: bool = True,
) -> None:
    """Store k[t], v[t] ([T, kv_heads, head_dim]) at cache slot slot_mapping[t]; slots of -1 are skipped.

    This is how blended KV lands in vLLM's paged cache for the attention backend in use.
    Slots are range-checked first (one device sync); check=False skips that for slots already checked.
    """
    check_kv_pair(k, v, "paged_kv_write")
    num_heads, head_dim = k.shape[1:]
    block_size = _check_cache(kv_cache, layout, num_heads, head_dim, k.dtype)
    check_index_vector(slot_mapping, k.shape[0], "slot_mapping")
    if check:
        check_index_ranges((slot_mapping, -1, _num_slots(kv_cache, layout, block_size), "slot_mapping"))
    if not use_triton(backend, k, v, kv_cache, slot_mapping):
        paged_kv_write_ref(k, v, kv_cache, slot_mapping, layout)
        return
    _launch_copy(k, v, kv_cache, slot_mapping, layout, block_size, to_cache=True)


def paged_kv_read(
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    num_kv_heads: int,
    head_dim: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ([T, kv_heads, head_dim] each) stored at the given slots (all valid, no -1).

    The inverse of `paged_kv_write`: reads cached prompt KV back out of vLLM's cache (slots range-checked,
    one device sync).
    """
    block_size = _check_cache(kv_cache, layout, num_kv_heads, head_dim, kv_cache.dtype)
    check_index_vector(slot_mapping, slot_mapping.numel(), "slot_mapping")
    check_index_ranges((slot_mapping, 0, _num_slots(kv_cache, layout, block_size), "slot_mapping"))
    if not use_triton(backend, kv_cache, slot_mapping):
        return paged_kv_read_ref(kv_cache, slot_mapping, layout, num_kv_heads, head_dim)
    shape = (slot_mapping.shape[0], num_kv_heads, head_dim)
    k = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    v = torch.empty_like(k)
    _launch_copy(k, v, kv_cache, slot_mapping, layout, block_size, to_cache=False)
    return k, v


def paged_kv_write_ref(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layout: str
) -> None:
    """Torch reference of `paged_kv_write` (indexed assignment through the layout's K and V views)."""
    cache_k, cache_v = _layout_views(kv_cache, layout, k.shape[1], k.shape[2])
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size = cache_v.shape[1] if layout == "flash" else cache_v.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    if layout == "flash":
        cache_k[blocks, offsets] = k[valid]
        cache_v[blocks, offsets] = v[valid]
    elif layout == "packed":
        cache_k[blocks, :, offsets] = k[valid]
        cache_v[blocks, :, offsets] = v[valid]
    else:
        cache_k[blocks, :, :, offsets] = k[valid]
        cache_v[blocks, :, offsets] = v[valid]


def paged_kv_read_ref(
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layout: str, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `paged_kv_read`."""
    cache_k, cache_v = _layout_views(kv_cache, layout, num_kv_heads, head_dim)
    block_size = cache_v.shape[1] if layout == "flash" else cache_v.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    if layout == "flash":
        return cache_k[blocks, offsets], cache_v[blocks, offsets]
    if layout == "packed":
        return cache_k[blocks, :, offsets], cache_v[blocks, :, offsets]
    return cache_k[blocks, :, :, offsets], cache_v[blocks, :, offsets]


def _layout_views(kv_cache: torch.Tensor, layout: str, num_heads: int, head_dim: int):
    """K and V views of the cache: flash [blocks, block_size, H, D] each; packed [blocks, H, block_size, D] each;
    cpu_attn K [blocks, H, D, block_size] (transposed) and V [blocks, H, block_size, D]."""
    if layout == "flash":
        return kv_cache[0], kv_cache[1]
    if layout == "packed":
        return kv_cache[..., :head_dim], kv_cache[..., head_dim:]
    num_blocks, _, block_size, _ = kv_cache.shape
    halves = kv_cache.view(num_blocks, num_heads, 2, block_size * head_dim)
    cache_k = halves[:, :, 0].unflatten(-1, (head_dim, block_size))
    cache_v = halves[:, :, 1].unflatten(-1, (block_size, head_dim))
    return cache_k, cache_v


def _launch_copy(k, v, kv_cache, slot_mapping, layout, block_size, to_cache: bool) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if layout == "flash":
        stride_block, stride_head = kv_cache.stride(1), kv_cache.stride(3)
        v_base = kv_cache.stride(0)
        k_offset_dim = v_offset_dim = (kv_cache.stride(2), kv_cache.stride(4))
    elif layout == "packed":
        stride_block, stride_head = kv_cache.stride(0), kv_cache.stride(1)
        v_base = head_dim * kv_cache.stride(3)
        k_offset_dim = v_offset_dim = (kv_cache.stride(2), kv_cache.stride(3))
    else:
        stride_block, stride_head = kv_cache.stride(0), kv_cache.stride(1)
        v_base = block_size * head_dim
        k_offset_dim, v_offset_dim = (1, block_size), (head_dim, 1)
    block_t = 4  # tokens per program: their slot loads overlap instead of serialising each copy behind one
    _paged_kv_copy_kernel[(triton.cdiv(num_tokens, block_t),)](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache, slot_mapping, num_tokens, block_size, num_heads, head_dim,
        v_base, stride_block, stride_head, *k_offset_dim, *v_offset_dim,
        TO_CACHE=to_cache,
        BLOCK_T=block_t,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def _check_cache(kv_cache: torch.Tensor, layout: str, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Refuse a cache that does not match the layout, heads, head_dim or dtype; return its block size."""
    if layout == "flash":
        ok = kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and tuple(kv_cache.shape[3:]) == (num_heads, head_dim)
        expected = f"[2, num_blocks, block_size, {num_heads}, {head_dim}]"
        block_size = kv_cache.shape[2] if ok else 0
    elif layout == "cpu_attn":
        ok = kv_cache.dim() == 4 and kv_cache.shape[1] == num_heads and kv_cache.shape[3] == 2 * head_dim
        ok = ok and kv_cache.stride(3) == 1 and kv_cache.stride(2) == 2 * head_dim
        expected = f"[num_blocks, {num_heads}, block_size, {2 * head_dim}] with contiguous (block_size, 2*head_dim)"
        block_size = kv_cache.shape[2] if ok else 0
    elif layout == "packed":
        ok = kv_cache.dim() == 4 and kv_cache.shape[1] == num_heads and kv_cache.shape[3] == 2 * head_dim
        expected = f"[num_blocks, {num_heads}, block_size, {2 * head_dim}]"
        block_size = kv_cache.shape[2] if ok else 0
    else:
        raise ValueError(
            f"unknown KV cache layout {layout!r} (cache shape {tuple(kv_cache.shape)}); "
            f"expected one of {', '.join(LAYOUTS)}"
        )
    if not ok:
        raise ValueError(
            f"KV cache of shape {tuple(kv_cache.shape)} does not match layout {layout!r}: expected {expected}"
        )
    if kv_cache.dtype != dtype:
        raise ValueError(f"KV cache dtype {kv_cache.dtype} differs from the K/V dtype {dtype}")
    return block_size


def _num_slots(kv_cache: torch.Tensor, layout: str, block_size: int) -> int:
    return (kv_cache.shape[1] if layout == "flash" else kv_cache.shape[0]) * block_size
