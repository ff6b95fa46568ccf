"""rms_norm: Triton kernel vs torch reference (HF Llama numerics) on random rows, odd sizes, strided rows."""

import pytest
import torch
from kernel_checks import assert_kernel_close

from kvblend.triton_kernels import rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel casts to x's dtype twice (normalised x, then the weight product); under TRITON_INTERPRET=1 each
# fp32 -> bf16 cast truncates instead of rounding, so bf16 may be up to ~2 ulps (2^-6 relative) off torch.
TOLERANCE = {torch.float32: (2e-6, 1e-6), torch.float16: (2e-3, 1e-5), torch.bfloat16: (2.4e-2, 1e-5)}
# (tokens, hidden)
SHAPES = [(1, 96), (7, 576), (33, 1000), (4, 4096)]
EPS = 1e-5


def make_case(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Rows of different scales, so the per-row statistics matter.
    x = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen).mul(8).add(0.1)
    weight = torch.randn(shape[1], generator=gen) * 0.5 + 1.0
    return x.to(DEVICE, dtype), weight.to(DEVICE, dtype)


def check_close(out, ref, dtype):
    assert_kernel_close(out, ref, dtype, TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, dtype, poisoned_empty):
    x, weight = make_case(shape, dtype, seed=shape[0] + shape[1])
    check_close(rms_norm(x, weight, EPS, backend="triton"), rms_norm(x, weight, EPS, backend="torch"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_transformers_llama_rms_norm_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, weight = make_case((9, 576), dtype, seed=1)
    norm = LlamaRMSNorm(576, eps=EPS).to(dtype)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(rms_norm_ref(x.cpu(), weight.cpu(), EPS), norm.cpu()(x.cpu()))


def test_reference_is_rms_normalisation():
    x, weight = make_case((5, 96), torch.float64, seed=2)
    expected = weight * x / (x.pow(2).mean(dim=1, keepdim=True) + 1e-6).sqrt()
    # Statistics in fp32 (then cast back to x's dtype) whatever the input dtype.
    torch.testing.assert_close(rms_norm_ref(x, weight, 1e-6), expected, rtol=1e-6, atol=1e-6)


def test_strided_rows(poisoned_empty):
    x, weight = make_case((66, 1200), torch.bfloat16, seed=3)
    view = x[1::2, 100:1100]  # row stride 2400, hidden 1000 starting at an offset
    out = rms_norm(view, weight[:1000].contiguous(), EPS, backend="triton")
    check_close(out, rms_norm_ref(view, weight[:1000], EPS), torch.bfloat16)


def test_large_eps_and_zero_rows():
    x, weight = make_case((7, 576), torch.float32, seed=4)
    x[3] = 0.0  # a zero row normalises to zeros (eps keeps it finite)
    out = rms_norm(x, weight, 0.5, backend="triton")
    check_close(out, rms_norm_ref(x, weight, 0.5), torch.float32)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_no_tokens():
    x, weight = make_case((0, 96), torch.float32, seed=0)
    assert rms_norm(x, weight, EPS, backend="triton").shape == (0, 96)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"][None]), "x must be"),
        (lambda a: a.update(x=a["x"].long()), "x must be"),
        (lambda a: a.update(weight=a["weight"][:-1]), "weight"),
        (lambda a: a.update(weight=a["weight"].half()), "weight"),
        (lambda a: a.update(weight=torch.ones(96, device="meta")), "weight"),
        (lambda a: a.update(x=a["x"].t().contiguous().t()), "contiguous"),
        (lambda a: a.update(eps=-1.0), "eps"),
        (lambda a: a.update(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_are_refused(change, message):
    x, weight = make_case((7, 96), torch.float32, seed=0)
    args = {"x": x, "weight": weight, "eps": EPS, "backend": "triton"}
    change(args)
    with pytest.raises(ValueError, match=message):
        rms_norm(**args)
