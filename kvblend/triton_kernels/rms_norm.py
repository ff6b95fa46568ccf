"""RMSNorm of token rows in one launch, with HF Llama's numerics.

Statistics in fp32: y = x * rsqrt(mean(x^2) + eps), cast back to x's dtype, THEN multiplied by the weight in
x's dtype (as `kvblend.model.runner.rms_norm` and HF's LlamaRMSNorm do). The product of two bf16/fp16
values is exact in fp32, so the kernel's fp32 multiply rounded once equals torch's multiply in x's dtype.
"""

from __future__ import annotations

import torch

from kvblend.triton_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        x, weight, out, num_rows, hidden, eps, x_stride, out_stride,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        col = tl.arange(0, BLOCK_H)[None, :]
        col_ok = col < hidden
        mask = (row < num_rows)[:, None] & col_ok
        row64 = row.to(tl.int64)[:, None]
        xf = tl.load(x + row64 * x_stride + col, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / hidden + eps)
        out_dtype = out.dtype.element_ty
        y = (xf * inv_rms[:, None]).to(out_dtype).to(tl.float32)
        w = tl.load(weight + col, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out + row64 * out_stride + col, (w * y).to(out_dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps) in fp32, cast to x's dtype): x [T, hidden], weight [hidden].

    Returns a new contiguous [T, hidden] tensor in x's dtype. x's rows may be strided (hidden must be contiguous).
    """
    _check_args(x, weight, eps)
    if not use_triton(backend, x, weight):
        return rms_norm_ref(x, weight, eps)
    num_rows, hidden = x.shape
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block_h = triton.next_power_of_2(hidden)
    block_t = max(1, min(16, 2048 // block_h))
    num_warps = min(16, max(4, block_t * block_h // 512))
    _rms_norm_kernel[(triton.cdiv(num_rows, block_t),)](
        x, weight, out, num_rows, hidden, float(eps), x.stride(0), out.stride(0),
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps,
    )
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference of `rms_norm`: the same math as `kvblend.model.runner.rms_norm` (bit-for-bit)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _check_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"rms_norm: x must be a floating [T, hidden] tensor, got {x.dtype} {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[1] or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"rms_norm: weight must be [{x.shape[1]}] of x's dtype {x.dtype} on {x.device}, "
            f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}"
        )
    if x.shape[1] == 0:
        raise ValueError("rms_norm: hidden size 0")
    if x.stride(1) != 1 or weight.stride(0) != 1:
        raise ValueError("rms_norm needs x with contiguous rows (stride 1 along hidden) and a contiguous weight")
    if not eps >= 0.0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
