"""Gather cached chunk K/V rows into a prompt buffer, re-rotating K from old to new positions.

Cached K carries RoPE at the position the chunk was computed at; placed at another position it must turn
by delta = new_pos - old_pos. Rotation is in fp32 from cos/sin of delta * freq, rounded once to the
output dtype, as `kvblend.rope.rope_shift` does. Only the first 2 * len(freq) dims rotate.
"""

from __future__ import annotations

import torch

from kvblend.rope import RopeSpec, check_rope_style, rope_shift
from kvblend.triton_kernels.checks import check_index_ranges, check_index_vector, check_kv_pair
from kvblend.triton_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvblend.triton_kernels.rotate_heads import rotate_heads

    @triton.jit
    def _rope_shift_gather_kernel(
        src_k, src_v, dst_k, dst_v, src_rows, dst_rows, delta, freq,
        src_k_stride_t, src_k_stride_h, src_v_stride_t, src_v_stride_h,
        dst_k_stride_t, dst_k_stride_h, dst_v_stride_t, dst_v_stride_h,
        num_heads, head_dim, num_pairs,
        NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_PAIRS: tl.constexpr, BLOCK_REST: tl.constexpr,
    ):
        i = tl.program_id(0)
        src_row = tl.load(src_rows + i)
        dst_row = tl.load(dst_rows + i)
        head = tl.arange(0, BLOCK_H)[:, None]
        head_ok = head < num_heads

        dim = tl.arange(0, BLOCK_D)[None, :]
        v_mask = head_ok & (dim < head_dim)
        v = tl.load(src_v + src_row * src_v_stride_t + head * src_v_stride_h + dim, mask=v_mask)
        tl.store(dst_v + dst_row * dst_v_stride_t + head * dst_v_stride_h + dim, v, mask=v_mask)

        pair = tl.arange(0, BLOCK_PAIRS)[None, :]
        angle = tl.load(delta + i).to(tl.float32) * tl.load(freq + pair, mask=pair < num_pairs, other=0.0)
        rotate_heads(
            src_k + src_row * src_k_stride_t, dst_k + dst_row * dst_k_stride_t, src_k_stride_h, dst_k_stride_h,
            num_heads, head_dim, num_pairs, tl.cos(angle), tl.sin(angle), NEOX, BLOCK_H, BLOCK_PAIRS, BLOCK_REST,
        )


def rope_shift_gather(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_rows: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_rows: torch.Tensor,
    delta: torch.Tensor,
    freq: torch.Tensor,
    style: str,
    backend: str = "auto",
    check: bool = True,
) -> None:
    """dst_k[dst_rows[i]] = src_k[src_rows[i]] turned by delta[i] * freq; dst_v[dst_rows[i]] = src_v[src_rows[i]].

    One launch places the K and V of many cached chunks into the prompt's buffer (dst_rows distinct).
    Row ranges are checked first (one device sync); check=False skips that for rows the caller has already
    checked, e.g. a blend plan's rows reused at every layer.
    """
    num_rows = check_rope_shift_args(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style, check)
    freq = freq.to(device=src_k.device, dtype=torch.float32)
    if not use_triton(backend, src_k, src_v, dst_k, dst_v, src_rows, dst_rows, delta, freq):
        rope_shift_gather_ref(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style)
        return
    if num_rows:
        _launch(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style)


def _launch(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style) -> None:
    num_heads, head_dim = src_k.shape[1:]
    num_pairs = freq.shape[0]
    rest = head_dim - 2 * num_pairs
    _rope_shift_gather_kernel[(src_rows.shape[0],)](
        src_k, src_v, dst_k, dst_v, src_rows, dst_rows, delta, freq,
        src_k.stride(0), src_k.stride(1), src_v.stride(0), src_v.stride(1),
        dst_k.stride(0), dst_k.stride(1), dst_v.stride(0), dst_v.stride(1),
        num_heads, head_dim, num_pairs,
        NEOX=style == "neox",
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_PAIRS=triton.next_power_of_2(num_pairs),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
    )


def rope_shift_gather_ref(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_rows: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    dst_rows: torch.Tensor,
    delta: torch.Tensor,
    freq: torch.Tensor,
    style: str,
) -> None:
    """Torch reference of `rope_shift_gather`: `kvblend.rope.rope_shift` (fp32 rotation, one rounding)
    on the gathered rows, then indexed copies."""
    dst_k[dst_rows] = rope_shift(src_k[src_rows], delta, RopeSpec(1.0, 2 * freq.shape[0], style), freq)
    dst_v[dst_rows] = src_v[src_rows]


def check_rope_shift_args(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style,
                          check_ranges: bool) -> int:
    """Validate rope_shift_gather's arguments (ranges too, when check_ranges); return the number of rows."""
    check_kv_pair(src_k, src_v, "rope_shift_gather source")
    check_kv_pair(dst_k, dst_v, "rope_shift_gather destination")
    if src_k.dtype != dst_k.dtype or src_k.shape[1:] != dst_k.shape[1:] or src_k.device != dst_k.device:
        raise ValueError(
            f"rope_shift_gather: source {src_k.dtype} {tuple(src_k.shape)} on {src_k.device} and destination "
            f"{dst_k.dtype} {tuple(dst_k.shape)} on {dst_k.device} differ in dtype, heads, head_dim or device"
        )
    check_rope_style(style)
    if freq.dim() != 1 or not 0 < 2 * freq.shape[0] <= src_k.shape[2]:
        raise ValueError(f"freq must be 1-D with 2 * len(freq) <= head_dim {src_k.shape[2]}, got {tuple(freq.shape)}")
    if any(t.stride(2) != 1 for t in (src_k, src_v, dst_k, dst_v)):
        raise ValueError("rope_shift_gather needs K and V with contiguous head_dim (stride 1)")
    num_rows = src_rows.numel()
    for name, index in (("src_rows", src_rows), ("dst_rows", dst_rows), ("delta", delta)):
        check_index_vector(index, num_rows, name)
    if check_ranges:
        check_index_ranges((src_rows, 0, src_k.shape[0], "src_rows"), (dst_rows, 0, dst_k.shape[0], "dst_rows"))
    return num_rows
