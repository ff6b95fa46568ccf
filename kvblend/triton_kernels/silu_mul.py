"""SwiGLU's gate: silu(gate) * up in one pass, in fp32, rounded once to the inputs' dtype.

`silu_mul_fused` takes the output of a fused gate/up projection, [T, 2 * I] with gate first, and runs the
same kernel on its two halves through strides (no copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvblend.triton_kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_kernel(gate, up, out, num_cols, gate_stride, up_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < num_cols
        g = tl.load(gate + row * gate_stride + col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up + row * up_stride + col, mask=mask, other=0.0).to(tl.float32)
        # silu(g) = g / (1 + exp(-g)), the form torch uses.
        tl.store(out + row * out_stride + col, (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate, up [T, I] of one dtype: fp32 math, one rounding; a new contiguous [T, I].

    Rows may be strided (the last dim must be contiguous).
    """
    _check_pair(gate, up)
    if not use_triton(backend, gate, up):
        return silu_mul_ref(gate, up)
    num_rows, num_cols = gate.shape
    out = torch.empty((num_rows, num_cols), dtype=gate.dtype, device=gate.device)
    if num_rows == 0 or num_cols == 0:
        return out
    block = min(1024, triton.next_power_of_2(num_cols))
    _silu_mul_kernel[(num_rows, triton.cdiv(num_cols, block))](
        gate, up, out, num_cols, gate.stride(0), up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
    )
    return out


def silu_mul_fused(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up where gate_up [T, 2 * I] holds gate in columns [0, I) and up in [I, 2 * I): [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul_fused: gate_up must be [T, 2 * I], got {tuple(gate_up.shape)}")
    half = gate_up.shape[1] // 2
    return silu_mul(gate_up[:, :half], gate_up[:, half:], backend=backend)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_mul`: HF Llama's `silu(gate) * up` in the inputs' dtype (the kernel computes in
    fp32 and rounds once, so in bf16 the two differ by rounding)."""
    return F.silu(gate) * up


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if (
        gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device
        or not gate.is_floating_point()
    ):
        raise ValueError(
            f"silu_mul: gate and up must be floating [T, I] of one shape, dtype and device, "
            f"got {gate.dtype} {tuple(gate.shape)} on {gate.device} and {up.dtype} {tuple(up.shape)} on {up.device}"
        )
    if gate.shape[1] > 1 and (gate.stride(1) != 1 or up.stride(1) != 1):
        raise ValueError("silu_mul needs gate and up with a contiguous last dim (stride 1)")
