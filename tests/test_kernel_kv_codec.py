"""kv_codec: the dequantize kernel vs its torch reference on random K/V, and the codecs' round-trip error."""

import pytest
import torch

from kvblend.triton_kernels.kv_codec import CODECS, dequantize_kv, dequantize_kv_ref, quantize_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (layers, tokens, kv heads, head_dim)
SHAPES = [(2, 37, 3, 64), (1, 5, 2, 128), (3, 1, 1, 64), (2, 9, 2, 48)]
# worst relative error of a value against its group's absolute maximum: half a code step
BOUND = {"fp8": 2.0 ** -4, "int6": 0.5 / 31, "int4": 0.5 / 7}
# the same fp32 product rounded to the output dtype; Triton's interpreter truncates to bf16 (one ulp apart)
TOLERANCE = {torch.float32: 0, torch.float16: 0, torch.bfloat16: 2.0 ** -7}


def random_kv(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[:-1] + (1,), generator=gen) * 20 + 0.01  # heads of very different magnitudes
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_reference(shape, codec, dtype, poisoned_empty):
    codes, scales = quantize_kv(random_kv(shape, seed=shape[1]), codec)
    out = dequantize_kv(codes, scales, codec, dtype, backend="triton")
    ref = dequantize_kv_ref(codes, scales, codec, dtype)
    assert out.dtype == dtype and out.shape == shape and not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype], atol=0)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_error_is_within_half_a_step(codec):
    x = random_kv((2, 50, 3, 64), seed=7)
    codes, scales = quantize_kv(x, codec)
    back = dequantize_kv(codes, scales, codec, torch.float32, backend="torch")
    top = x.unflatten(-1, (scales.shape[-1], -1)).abs().amax(-1, keepdim=True)
    error = (back - x).unflatten(-1, (scales.shape[-1], -1)).abs() / top
    assert error.max().item() <= BOUND[codec] + 1e-6
    assert (back - x).abs().max().item() > 0  # lossy: the check above is not vacuous


def test_layers_apart_as_an_entry_read_leaves_them(poisoned_empty):
    x = random_kv((3, 11, 2, 64), seed=3)
    codes, scales = quantize_kv(x, "int4")
    padded = torch.zeros((3, 2) + codes.shape[1:], dtype=codes.dtype, device=codes.device)
    padded[:, 1] = codes
    out = dequantize_kv(padded[:, 1], scales, "int4", torch.bfloat16, backend="triton")
    ref = dequantize_kv_ref(codes, scales, "int4", torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[torch.bfloat16], atol=0)


def test_zero_group_and_bad_arguments():
    x = random_kv((1, 4, 2, 64), seed=1)
    x[0, 1] = 0
    codes, scales = quantize_kv(x, "fp8")
    assert torch.equal(dequantize_kv(codes, scales, "fp8", torch.float32, backend="torch")[0, 1], x[0, 1])
    with pytest.raises(ValueError, match="unknown KV codec"):
        quantize_kv(x, "int2")
    with pytest.raises(ValueError, match="fp32 scales"):
        dequantize_kv(codes, scales.half(), "fp8", torch.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_kv(x[..., :60], "int6")
