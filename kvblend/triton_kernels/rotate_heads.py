"""The Triton helper both RoPE kernels share: rotate the heads of one token by per-pair cos/sin (fp32)."""

from kvblend.triton_kernels.dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def rotate_heads(
        src, dst, src_stride_h, dst_stride_h, num_heads, head_dim, num_pairs, cos, sin,
        NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_REST: tl.constexpr,
    ):
        """dst[h, :] = src[h, :] with its first 2 * num_pairs dims rotated pairwise (neox halves or gptj
        neighbours) in fp32 and rounded once to dst's dtype; the remaining dims copied."""
        head = tl.arange(0, BLOCK_H)[:, None]
        head_ok = head < num_heads
        pair = tl.arange(0, BLOCK_PAIRS)[None, :]
        mask = head_ok & (pair < num_pairs)
        if NEOX:
            first = pair
            second = pair + num_pairs
        else:
            first = 2 * pair
            second = 2 * pair + 1
        src_row = src + head * src_stride_h
        dst_row = dst + head * dst_stride_h
        x1 = tl.load(src_row + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_row + second, mask=mask, other=0.0).to(tl.float32)
        out_dtype = dst.dtype.element_ty
        tl.store(dst_row + first, (x1 * cos - x2 * sin).to(out_dtype), mask=mask)
        tl.store(dst_row + second, (x2 * cos + x1 * sin).to(out_dtype), mask=mask)
        if BLOCK_REST > 0:
            rest = 2 * num_pairs + tl.arange(0, BLOCK_REST)[None, :]
            rest_mask = head_ok & (rest < head_dim)
            tl.store(dst_row + rest, tl.load(src_row + rest, mask=rest_mask), mask=rest_mask)
