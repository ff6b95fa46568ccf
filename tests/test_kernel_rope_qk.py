"""rope_qk: Triton kernel vs torch reference on random Q/K, both RoPE styles, partial rotary, strided views."""

import pytest
import torch

from kvblend.rope import RopeSpec, apply_rope, cos_sin, inv_freq, rotate
from kvblend.triton_kernels import rope_qk, rope_qk_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (tokens, q heads, k heads, head_dim, rotary_dim)
SHAPES = [(1, 9, 3, 64, 64), (7, 9, 3, 128, 64), (33, 32, 8, 128, 128), (7, 32, 8, 64, 48), (33, 9, 3, 128, 96)]
STYLES = ["neox", "gptj"]


def make_case(shape, dtype, style="neox", seed=0, max_pos=8000):
    tokens, q_heads, k_heads, head_dim, rotary_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, q_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(tokens, k_heads, head_dim, generator=gen).to(DEVICE, dtype)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    spec = RopeSpec(theta=500000.0, rotary_dim=rotary_dim, style=style)
    cos, sin = cos_sin(inv_freq(spec).to(DEVICE), positions)
    return q, k, cos, sin, positions, spec


def pair_magnitude(x, half, style):
    """max(|x1|, |x2|) of the rotation pair each of the first 2 * half dims belongs to (fp32)."""
    rot = x[..., : 2 * half].float().abs()
    if style == "neox":
        top = torch.maximum(rot[..., :half], rot[..., half:])
        return torch.cat((top, top), dim=-1)
    top = torch.maximum(rot[..., 0::2], rot[..., 1::2])
    return torch.stack((top, top), dim=-1).flatten(-2)


def check_rotated(out, ref, x, half, style):
    """Pass-through dims exact; rotated dims within a bound scaled by the pair's magnitude m = max(|x1|, |x2|).

    With u = 2^-p (p = 8 bf16, 11 fp16, 24 fp32), one rounding of v errs by at most u|v|. Torch rounds both
    products (each <= m) and the result (<= sqrt(2) m): <= 3.5 u m. The kernel rounds the exact fp32 sum once;
    under TRITON_INTERPRET=1 the bf16 casts truncate (2u|v|) both of cos/sin and of the result: <= 5.7 u m.
    On the GPU (round to nearest, FMA for fp32) the kernel is nearer torch. Bound: 10 u m.
    """
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    assert not out.isnan().any()
    assert torch.equal(out[..., 2 * half :], x[..., 2 * half :])
    unit = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[x.dtype]
    bound = 10 * unit * pair_magnitude(x, half, style) + 1e-30
    error = (out[..., : 2 * half].float() - ref[..., : 2 * half].float()).abs()
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, worst excess {(error - bound).max().item():.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, style, dtype, poisoned_empty):
    q, k, cos, sin, _, _ = make_case(shape, dtype, style, seed=shape[0] + shape[4])
    out_q, out_k = rope_qk(q, k, cos, sin, style, backend="triton")
    ref_q, ref_k = rope_qk(q, k, cos, sin, style, backend="torch")
    check_rotated(out_q, ref_q, q, cos.shape[1], style)
    check_rotated(out_k, ref_k, k, cos.shape[1], style)


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("style", STYLES)
def test_fp16_is_fp32_math_of_rounded_operands(shape, style):
    """The kernel's numerics exactly: cos/sin rounded to fp16, fp32 arithmetic (products exact), one rounding."""
    q, k, cos, sin, _, _ = make_case(shape, torch.float16, style, seed=5)
    out_q, out_k = rope_qk(q, k, cos, sin, style, backend="triton")
    cos16, sin16 = cos.half().float(), sin.half().float()
    assert torch.equal(out_q, rotate(q.float(), cos16, sin16, style).half())
    assert torch.equal(out_k, rotate(k.float(), cos16, sin16, style).half())


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_model_rope_bit_for_bit(style, dtype):
    q, k, cos, sin, positions, spec = make_case(SHAPES[4], dtype, style, seed=6)
    ref_q, ref_k = rope_qk_ref(q, k, cos, sin, style)
    assert torch.equal(ref_q, rotate(q, cos, sin, style)) and torch.equal(ref_k, rotate(k, cos, sin, style))
    assert torch.equal(ref_q, apply_rope(q, positions, spec)) and torch.equal(ref_k, apply_rope(k, positions, spec))


def test_position_zero_is_identity():
    q, k, cos, sin, _, _ = make_case(SHAPES[3], torch.bfloat16, seed=7, max_pos=1)
    out_q, out_k = rope_qk(q, k, cos, sin, "gptj", backend="triton")
    assert torch.equal(out_q, q) and torch.equal(out_k, k)


@pytest.mark.parametrize("style", STYLES)
def test_strided_views_of_a_fused_qkv(style, poisoned_empty):
    """q and k as head views of one [T, (Hq + 2 Hk) * D] projection, cos/sin as slices of a wider table."""
    tokens, q_heads, k_heads, head_dim, rotary_dim = SHAPES[1]
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + k_heads) * head_dim].view(tokens, k_heads, head_dim)
    angles = torch.rand(tokens, rotary_dim, generator=gen).to(DEVICE) * 100
    cos, sin = angles.cos()[:, : rotary_dim // 2], angles.sin()[:, 1 : rotary_dim // 2 + 1]
    assert not q.is_contiguous() and cos.stride(0) == rotary_dim
    out_q, out_k = rope_qk(q, k, cos, sin, style, backend="triton")
    ref_q, ref_k = rope_qk_ref(q, k, cos, sin, style)
    check_rotated(out_q, ref_q, q, rotary_dim // 2, style)
    check_rotated(out_k, ref_k, k, rotary_dim // 2, style)


def test_no_tokens():
    q, k, cos, sin, _, _ = make_case(SHAPES[0], torch.float32)
    out_q, out_k = rope_qk(q[:0], k[:0], cos[:0], sin[:0], "neox", backend="triton")
    assert out_q.shape == (0, 9, 64) and out_k.shape == (0, 3, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(style="yarn"), "rope style"),
        (lambda a: a.update(backend="cuda"), "backend"),
        (lambda a: a.update(k=a["k"].half()), "q and k"),
        (lambda a: a.update(k=a["k"][:-1]), "q and k"),
        (lambda a: a.update(q=a["q"][..., :32]), "q and k"),
        (lambda a: a.update(q=a["q"][0]), "q and k"),
        (lambda a: a.update(q=a["q"].long(), k=a["k"].long()), "q and k"),
        (lambda a: a.update(cos=a["cos"][:-1], sin=a["sin"][:-1]), "cos and sin"),
        (lambda a: a.update(sin=a["sin"][:, :-1]), "cos and sin"),
        (lambda a: a.update(cos=torch.ones(7, 40), sin=torch.ones(7, 40)), "rotary_dim"),
        (lambda a: a.update(cos=a["cos"].double()), "cos and sin"),
        (lambda a: a.update(cos=torch.ones(7, 32, device="meta"), sin=torch.ones(7, 32, device="meta")), "cos/sin on"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
    ],
)
def test_bad_arguments_are_refused(change, message):
    q, k, cos, sin, _, _ = make_case((7, 9, 3, 64, 64), torch.float32)
    args = {"q": q, "k": k, "cos": cos, "sin": sin, "style": "neox", "backend": "triton"}
    change(args)
    with pytest.raises(ValueError, match=message):
        rope_qk(**args)
