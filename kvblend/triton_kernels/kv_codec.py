"""Storage codecs of chunk KV: fp8 e4m3 with a scale per token and head; int6 and int4 with a scale per group of
32 channels.

`quantize_kv` (torch, on the writer) turns [..., head_dim] K or V into codes and fp32 scales [..., groups];
`dequantize_kv` turns them back into the model dtype on the reader's device: a Triton kernel on GPU (the codes
cross PCIe compressed), the torch reference on CPU. Integer codes are q + 2^(bits-1), unsigned: int4 two a byte,
the even channel in the low nibble; int6 four in three bytes, little-endian (channel 4i in bits 0-5 of the 24).
"""

from __future__ import annotations

import torch

from kvblend.triton_kernels.dispatch import HAS_TRITON, use_triton

CODECS = ("fp8", "int6", "int4")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT_BITS = {"int6": 6, "int4": 4}
INT_GROUP = 32  # channels per integer codec's scale (a head_dim not divisible by it gets one group per head)


def scale_groups(codec: str, head_dim: int) -> int:
    """How many scales each token's head has under `codec`."""
    if codec == "fp8":
        return 1
    if codec in INT_BITS:
        if head_dim % 8:  # whole bytes of codes, and codes that keep the fp32 scales after them aligned
            raise ValueError(f"{codec} needs a head_dim that is a multiple of 8, got {head_dim}")
        return head_dim // INT_GROUP if head_dim % INT_GROUP == 0 else 1
    raise ValueError(f"unknown KV codec {codec!r}; expected one of {CODECS}")


def code_dim(codec: str, head_dim: int) -> int:
    """Length of the codes' last axis: one fp8 byte a channel, three int6 bytes four, one int4 byte two."""
    scale_groups(codec, head_dim)
    return head_dim if codec == "fp8" else head_dim * INT_BITS[codec] // 8


def head_dim_of(codec: str, width: int) -> int:
    """The head_dim whose codes are `width` long."""
    if codec not in CODECS:
        raise ValueError(f"unknown KV codec {codec!r}; expected one of {CODECS}")
    return width * 8 // INT_BITS.get(codec, 8)


def int_max(codec: str) -> float:
    """The largest code magnitude of an integer codec (its scale maps a group's absolute maximum there)."""
    return float(2 ** (INT_BITS[codec] - 1) - 1)


def quantize_kv(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 scales [..., groups]) of x [..., head_dim]; each group's absolute maximum maps to the
    codec's largest code (an all-zero group gets scale 1)."""
    groups = scale_groups(codec, x.shape[-1])
    grouped = x.float().unflatten(-1, (groups, -1))
    top = FP8_MAX if codec == "fp8" else int_max(codec)
    scales = grouped.abs().amax(dim=-1, keepdim=True) / top
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = (grouped / scales).flatten(-2)
    if codec == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous(), scales.squeeze(-1).contiguous()
    q = (scaled.round().clamp(-top - 1, top) + top + 1).to(torch.uint8)
    if codec == "int4":
        codes = q[..., 0::2] | (q[..., 1::2] << 4)
    else:
        a, b, c, d = (q[..., i::4] for i in range(4))
        codes = torch.stack((a | (b << 6), (b >> 2) | (c << 4), (c >> 4) | (d << 2)), dim=-1).flatten(-2)
    return codes.contiguous(), scales.squeeze(-1).contiguous()


def dequantize_kv_ref(codes: torch.Tensor, scales: torch.Tensor, codec: str, dtype: torch.dtype) -> torch.Tensor:
    """Torch reference of `dequantize_kv`."""
    if codec == "fp8":
        values = codes.float()
    elif codec == "int4":
        values = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).float() - 8
    else:
        b0, b1, b2 = (codes[..., i::3] for i in range(3))
        q = torch.stack((b0 & 63, (b0 >> 6) | ((b1 & 15) << 2), (b1 >> 4) | ((b2 & 3) << 4), b2 >> 2), dim=-1)
        values = q.flatten(-2).float() - 32
    grouped = values.unflatten(-1, (scales.shape[-1], -1)) * scales.float().unsqueeze(-1)
    return grouped.flatten(-2).to(dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dequantize_kernel(
        codes, scales, out, num_rows, codes_layer_stride, scales_layer_stride,
        BITS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        layer = tl.program_id(1).to(tl.int64)
        row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = row < num_rows
        row64 = row.to(tl.int64)[:, None]
        channel = tl.arange(0, BLOCK_D)[None, :]
        mask = row_ok[:, None] & (channel < HEAD_DIM)
        scale = tl.load(scales + layer * scales_layer_stride + row64 * GROUPS + channel // (HEAD_DIM // GROUPS),
                        mask=mask, other=0.0)
        row_codes = codes + layer * codes_layer_stride + row64 * (HEAD_DIM * BITS // 8)
        if BITS == 4:
            byte = tl.load(row_codes + channel // 2, mask=mask, other=0).to(tl.int32)
            value = ((byte >> ((channel % 2) * 4)) & 15).to(tl.float32) - 8.0
        elif BITS == 6:  # the three bytes of the channel's group of four, then its 6 bits of their 24
            first = row_codes + (channel // 4) * 3
            bits = (tl.load(first, mask=mask, other=0).to(tl.int32)
                    | (tl.load(first + 1, mask=mask, other=0).to(tl.int32) << 8)
                    | (tl.load(first + 2, mask=mask, other=0).to(tl.int32) << 16))
            value = ((bits >> ((channel % 4) * 6)) & 63).to(tl.float32) - 32.0
        else:
            code = tl.load(row_codes + channel, mask=mask, other=0)
            value = code.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        out_row = (layer * num_rows + row64) * HEAD_DIM
        tl.store(out + out_row + channel, (value * scale).to(out.dtype.element_ty), mask=mask)


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, codec: str, dtype: torch.dtype,
                  backend: str = "auto") -> torch.Tensor:
    """K or V [layers, tokens, kv_heads, head_dim] in `dtype` from `quantize_kv`'s codes and scales (each layer of
    them contiguous; layers may lie apart, as an entry read leaves them)."""
    if codes.dim() != 4 or scales.dim() != 4 or codes.shape[:3] != scales.shape[:3] or codes.device != scales.device:
        raise ValueError(f"dequantize_kv: codes {tuple(codes.shape)} and scales {tuple(scales.shape)} must be "
                         f"[layers, tokens, kv_heads, ...] of one device")
    want = torch.float8_e4m3fn if codec == "fp8" else torch.uint8
    head_dim = head_dim_of(codec, codes.shape[-1])
    if codes.dtype != want or scales.dtype != torch.float32 or scales.shape[-1] != scale_groups(codec, head_dim):
        raise ValueError(f"dequantize_kv: {codec} wants {want} codes and fp32 scales of {scale_groups(codec, head_dim)} "
                         f"groups, got {codes.dtype} and {scales.dtype} {tuple(scales.shape)}")
    if not use_triton(backend, codes, scales):
        return dequantize_kv_ref(codes, scales, codec, dtype)
    codes, scales = _layers_contiguous(codes), _layers_contiguous(scales)
    layers, tokens, heads, _ = codes.shape
    out = torch.empty((layers, tokens, heads, head_dim), dtype=dtype, device=codes.device)
    rows = tokens * heads
    if out.numel() == 0:
        return out
    block_r = max(1, 2048 // triton.next_power_of_2(head_dim))
    _dequantize_kernel[(triton.cdiv(rows, block_r), layers)](
        codes.view(torch.uint8), scales, out, rows, codes.stride(0), scales.stride(0),
        BITS=INT_BITS.get(codec, 8), HEAD_DIM=head_dim, GROUPS=scales.shape[-1], BLOCK_R=block_r,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


def _layers_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when each layer is one contiguous run, else a contiguous copy."""
    inner = x[0] if len(x) else x
    return x if inner.is_contiguous() else x.contiguous()
