"""silu_mul and silu_mul_fused: Triton kernel vs torch reference on random gate/up, odd widths, strided rows."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_kernel_close

from kvblend.triton_kernels import silu_mul, silu_mul_fused, silu_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 math, one rounding: bf16/fp16 within an ulp (the interpreter truncates bf16). fp32: tl.exp may be
# an approximate exp2 on the GPU, a few ulps.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}
# (tokens, intermediate)
SHAPES = [(1, 96), (7, 1000), (33, 576), (5, 2500)]


def make_gate_up(tokens, width, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, width, generator=gen) * 3).to(DEVICE, dtype)


def check_close(out, ref, dtype):
    assert_kernel_close(out, ref, dtype, TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, dtype, poisoned_empty):
    tokens, inter = shape
    gate, up = make_gate_up(tokens, inter, dtype, seed=inter), make_gate_up(tokens, inter, dtype, seed=inter + 1)
    check_close(silu_mul(gate, up, backend="triton"), silu_mul(gate, up, backend="torch"), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(shape, dtype, poisoned_empty):
    tokens, inter = shape
    gate_up = make_gate_up(tokens, 2 * inter, dtype, seed=tokens)
    out = silu_mul_fused(gate_up, backend="triton")
    check_close(out, silu_mul_ref(gate_up[:, :inter], gate_up[:, inter:]), dtype)
    check_close(silu_mul_fused(gate_up, backend="torch"), silu_mul_ref(gate_up[:, :inter], gate_up[:, inter:]), dtype)


def test_reference_is_silu_times_up():
    gate, up = make_gate_up(5, 96, torch.float64, seed=0), make_gate_up(5, 96, torch.float64, seed=1)
    # The reference is HF Llama's silu(gate) * up in the inputs' dtype.
    torch.testing.assert_close(silu_mul_ref(gate, up), gate * torch.sigmoid(gate) * up, rtol=1e-6, atol=1e-6)
    bf_gate, bf_up = gate.bfloat16(), up.bfloat16()
    assert torch.equal(silu_mul_ref(bf_gate, bf_up), F.silu(bf_gate) * bf_up)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(200) -> inf
def test_large_gates_stay_finite(poisoned_empty):
    gate = torch.tensor([[-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0]], device=DEVICE)
    up = torch.full_like(gate, 0.5)
    out = silu_mul(gate, up, backend="triton")
    check_close(out, silu_mul_ref(gate, up), torch.float32)


def test_strided_rows(poisoned_empty):
    wide = make_gate_up(14, 3000, torch.bfloat16, seed=2)
    gate, up = wide[::2, :1000], wide[1::2, 1500:2500]
    check_close(silu_mul(gate, up, backend="triton"), silu_mul_ref(gate, up), torch.bfloat16)


def test_no_tokens():
    assert silu_mul(*(torch.zeros(0, 96, device=DEVICE),) * 2, backend="triton").shape == (0, 96)
    assert silu_mul_fused(torch.zeros(0, 192, device=DEVICE), backend="triton").shape == (0, 96)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(up=a["up"][:-1]), "gate and up"),
        (lambda a: a.update(up=a["up"].half()), "gate and up"),
        (lambda a: a.update(gate=a["gate"][None], up=a["up"][None]), "gate and up"),
        (lambda a: a.update(gate=a["gate"].long(), up=a["up"].long()), "gate and up"),
        (lambda a: a.update(up=torch.ones(7, 96, device="meta")), "gate and up"),
        (lambda a: a.update(gate=a["gate"].t().contiguous().t()), "contiguous"),
        (lambda a: a.update(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_are_refused(change, message):
    gate, up = make_gate_up(7, 96, torch.float32, 0), make_gate_up(7, 96, torch.float32, 1)
    args = {"gate": gate, "up": up, "backend": "triton"}
    change(args)
    with pytest.raises(ValueError, match=message):
        silu_mul(**args)


def test_bad_fused_width_is_refused():
    with pytest.raises(ValueError, match="2 \\* I"):
        silu_mul_fused(make_gate_up(7, 97, torch.float32, 0), backend="triton")
    with pytest.raises(ValueError, match="2 \\* I"):
        silu_mul_fused(make_gate_up(7, 96, torch.float32, 0)[None], backend="triton")
