"""RoPE of Q and K at their positions in one launch: each program turns all query and key heads of one token.

Numerics follow `kvblend.rope.rotate` (HF's apply_rotary_pos_emb): cos/sin are rounded to the tensors'
dtype first. The kernel then multiplies and adds in fp32 and rounds the result once, where torch rounds each
product and the sum to the tensor dtype. For bf16/fp16 the fp32 products of two rounded operands are exact, so
the kernel's result is the correctly rounded x1*cos -/+ x2*sin; torch's can differ from it by about one ulp
of the larger product |x1*cos| or |x2*sin| (so by more than one ulp of the result when the two cancel). For
fp32 a GPU compile may fuse a multiply and the add (FMA): a difference of the order of an fp32 ulp. Under
TRITON_INTERPRET=1 the fp32 -> bf16 casts truncate instead of rounding to nearest (one more ulp).
Only the first 2 * cos.shape[1] dims rotate (neox halves or gptj neighbours); the rest are copied.
"""

from __future__ import annotations

import torch

from kvblend.rope import check_rope_style, rotate
from kvblend.triton_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvblend.triton_kernels.rotate_heads import rotate_heads

    @triton.jit
    def _rope_qk_kernel(
        q, k, cos, sin, q_out, k_out,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, q_out_stride_t, q_out_stride_h,
        k_out_stride_t, k_out_stride_h, cos_stride, sin_stride,
        num_q_heads, num_k_heads, head_dim, num_pairs,
        NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
        BLOCK_PAIRS: tl.constexpr, BLOCK_REST: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        pair = tl.arange(0, BLOCK_PAIRS)[None, :]
        pair_ok = pair < num_pairs
        # cos/sin rounded to the tensors' dtype first (as HF does), then used in fp32.
        x_dtype = q_out.dtype.element_ty
        c = tl.load(cos + token * cos_stride + pair, mask=pair_ok, other=0.0).to(x_dtype).to(tl.float32)
        s = tl.load(sin + token * sin_stride + pair, mask=pair_ok, other=0.0).to(x_dtype).to(tl.float32)
        rotate_heads(
            q + token * q_stride_t, q_out + token * q_out_stride_t, q_stride_h, q_out_stride_h,
            num_q_heads, head_dim, num_pairs, c, s, NEOX, BLOCK_HQ, BLOCK_PAIRS, BLOCK_REST,
        )
        rotate_heads(
            k + token * k_stride_t, k_out + token * k_out_stride_t, k_stride_h, k_out_stride_h,
            num_k_heads, head_dim, num_pairs, c, s, NEOX, BLOCK_HK, BLOCK_PAIRS, BLOCK_REST,
        )


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [T, Hq, D] and k [T, Hk, D] by cos/sin [T, rotary_dim / 2]: new contiguous (q, k), one launch.

    Token i turns by the angles of row i of cos/sin; dims from rotary_dim on pass through unchanged. Inputs may
    be strided views (e.g. slices of a fused QKV projection) as long as head_dim is contiguous.
    """
    _check_args(q, k, cos, sin, style)
    if not use_triton(backend, q, k, cos, sin):
        return rope_qk_ref(q, k, cos, sin, style)
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    num_pairs = cos.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    rest = head_dim - 2 * num_pairs
    _rope_qk_kernel[(num_tokens,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
        k_out.stride(0), k_out.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, num_k_heads, head_dim, num_pairs,
        NEOX=style == "neox",
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        BLOCK_PAIRS=triton.next_power_of_2(num_pairs),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        num_warps=4,
    )
    return q_out, k_out


def rope_qk_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rope_qk`: `kvblend.rope.rotate` (arithmetic in the tensors' dtype) on q and k."""
    return rotate(q, cos, sin, style), rotate(k, cos, sin, style)


def _check_args(q, k, cos, sin, style) -> None:
    check_rope_style(style)
    if (
        q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]
        or q.dtype != k.dtype or q.device != k.device or not q.is_floating_point()
    ):
        raise ValueError(
            f"rope_qk: q and k must be floating [T, heads, head_dim] of one T, head_dim, dtype and device, "
            f"got q {q.dtype} {tuple(q.shape)} on {q.device}, k {k.dtype} {tuple(k.shape)} on {k.device}"
        )
    if (
        cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != q.shape[0]
        or not 0 < 2 * cos.shape[1] <= q.shape[2] or not cos.is_floating_point() or sin.dtype != cos.dtype
    ):
        raise ValueError(
            f"rope_qk: cos and sin must be floating [T={q.shape[0]}, rotary_dim / 2] of one dtype with "
            f"0 < rotary_dim <= head_dim {q.shape[2]}, got cos {cos.dtype} {tuple(cos.shape)}, "
            f"sin {sin.dtype} {tuple(sin.shape)}"
        )
    if cos.device != q.device or sin.device != q.device:
        raise ValueError(f"rope_qk: cos/sin on {cos.device}/{sin.device}, q and k on {q.device}")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("rope_qk needs q and k with contiguous head_dim and cos/sin with contiguous rows (stride 1)")
